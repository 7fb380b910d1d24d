"""Tools on the chat API: what a request's `tools` and `tool_choice` mean here, what the chat template
is given, and how a reply's calls become OpenAI `tool_calls`.

- `tools` go to the model's chat template (HF's `apply_chat_template(tools=...)`), which describes
  them to the model in its own format; the reply is read back by the server's tool-call parser
  (tool_parsers: `llama3_json` or `hermes`, set by `--tool-call-parser` or picked from the template).
- `tool_choice`: `auto` (the default with tools) reads calls out of the reply; `none` still shows
  the tools to the template, as vLLM does, but reads the reply as plain content, so it never has
  calls; `required` and a named function are enforced: the structured output grammar holds the
  reply to calls, read back by forced_tools (no parser needed), and a named function shows the
  template that one tool only.
- `parallel_tool_calls: false` keeps the first call of a reply.
- History: an assistant message's `tool_calls` reach the template with their arguments as a JSON
  object (templates write them with `tojson`), and a `tool` message keeps its `tool_call_id`.

A request with tools left to `auto` on a server that has no parser is refused with a 400 that says how to set one,
rather than served with its tools silently unread.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from tandem.frontend.forced_tools import NamedFunctionReader, RequiredCallsReader
from tandem.frontend.openai_protocol import (ChatCompletionRequest, ChatMessage, DeltaToolCall,
                                           FunctionCallOut, ToolCallOut)
from tandem.frontend.request_rules import RequestError
from tandem.frontend.tool_parsers import PARSERS, ParsedToolCall, ToolCallParser


@dataclass(frozen=True, slots=True)
class ToolCalling:
    """How one request's reply is read for tool calls."""
    parser: ToolCallParser
    max_calls: int | None = None     # 1 when parallel_tool_calls is false
    finish_reason: str = "tool_calls"  # of a reply with calls that stopped on its own

    def keep(self, calls: list[ParsedToolCall], num_sent: int = 0) -> list[ParsedToolCall]:
        """The calls still allowed after `num_sent` were already sent."""
        if self.max_calls is None:
            return calls
        return calls[: max(0, self.max_calls - num_sent)]


def tool_calling(request: ChatCompletionRequest, parser: ToolCallParser | None) -> ToolCalling | None:
    """How `request`'s reply is read: None for plain content. Raises RequestError for a
    tool_choice that names no tool given, or tools a server without a parser cannot read."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none"):
            raise RequestError(f"tool_choice {_choice_text(choice)} needs tools: send the "
                               "functions in `tools`", "tool_choice")
        return None
    _check_named_choice(request)
    if choice == "none":
        return None
    max_calls = 1 if request.parallel_tool_calls is False else None
    if choice == "required":
        return ToolCalling(RequiredCallsReader(), max_calls)
    if choice not in (None, "auto"):   # a named function: one call, finishing as OpenAI's do
        return ToolCalling(NamedFunctionReader(choice.function.name), 1, finish_reason="stop")
    if parser is None:
        raise RequestError("tools cannot be used with this model: its chat template shows no "
                           "tool-call format this server reads; start it with --tool-call-parser "
                           f"({' or '.join(sorted(PARSERS))}) to match the template", "tools")
    return ToolCalling(parser, max_calls)


def template_tools(request: ChatCompletionRequest) -> list[dict] | None:
    """The tools the chat template is given: all, or the one a tool_choice names."""
    if not request.tools:
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    if not isinstance(request.tool_choice, str) and request.tool_choice is not None:
        named = request.tool_choice.function.name
        tools = [tool for tool in tools if tool["function"]["name"] == named]
    return tools


def template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    """One message as chat templates read it."""
    # Templates know system/user/assistant/tool; "developer" is OpenAI's newer name for system.
    out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                           "content": message.content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name,
                          "arguments": _arguments(call.function.arguments,
                                                  f"messages.{index}.tool_calls.{k}")}}
            for k, call in enumerate(message.tool_calls)]
    return out


def num_tool_chars(request: ChatCompletionRequest) -> int:
    """Characters the tools and past calls add to the prompt, for the prompt-size limit."""
    tools = sum(len(json.dumps(tool.model_dump(exclude_none=True))) for tool in request.tools or [])
    calls = sum(len(call.function.arguments) + len(call.function.name)
                for message in request.messages for call in message.tool_calls or [])
    return tools + calls


def tool_call_out(call: ParsedToolCall) -> ToolCallOut:
    return ToolCallOut(id=new_call_id(), function=FunctionCallOut(name=call.name,
                                                                  arguments=call.arguments))


def tool_call_delta(call: ParsedToolCall, index: int) -> DeltaToolCall:
    return DeltaToolCall(index=index, id=new_call_id(),
                         function=FunctionCallOut(name=call.name, arguments=call.arguments))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _check_named_choice(request: ChatCompletionRequest) -> None:
    choice = request.tool_choice
    if choice is None or isinstance(choice, str):
        return
    names = [tool.function.name for tool in request.tools or []]
    if choice.function.name not in names:
        raise RequestError(f"tool_choice names the function {choice.function.name!r}, which is "
                           f"not among the tools ({', '.join(map(repr, names))})", "tool_choice")


def _arguments(text: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise RequestError(f"{param}.function.arguments must be a JSON object as text, got "
                           f"{text[:60]!r}", f"{param}.function.arguments")
    return value


def _choice_text(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else repr(choice.function.name)
