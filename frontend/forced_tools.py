"""`tool_choice: "required"` and a named function, enforced: the reply is held by the structured
output grammar (engine/structured_output.py) to a tool call, as vLLM does it.

- A named function (`{"type": "function", "function": {"name": "f"}}`): the reply is f's arguments,
  a JSON object matching f's `parameters` schema, returned as one call of f. As in vLLM and OpenAI,
  the choice ends with finish_reason `stop`.
- `required`: the reply is a JSON array of at least one call, each
  `{"name": <one of the tools>, "parameters": <that tool's arguments>}`; with
  `parallel_tool_calls: false` at most one. The choice ends with `tool_calls`.

A tool without `parameters` takes none: its arguments are `{}`. The grammar is the model's
tokenizer's, not its chat template's: whatever tool-call markup the model was trained on, these
replies are plain JSON, and need no tool-call parser on the server (vLLM's choice too; the tools
still reach the chat template, so the model knows what it is calling).

A reply cut by `max_tokens` keeps the calls that completed; when none did, its text comes back as
content (named: as the call's arguments, unfinished), with finish_reason `length` either way.
The readers below are pure, and whole replies are read by feeding the stream reader, so a reply
reads the same whole or streamed.
"""

from __future__ import annotations

import json
from typing import Any

from tandem.frontend.openai_protocol import ChatCompletionRequest, ToolDefinition
from tandem.frontend.tool_parsers import ParsedOutput, ParsedToolCall, StreamDelta, call_from_json

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
_DECODER = json.JSONDecoder()


def is_forced(tool_choice: Any) -> bool:
    """Whether this tool_choice holds the reply to a call (required or a named function)."""
    return tool_choice == "required" or not (tool_choice is None or isinstance(tool_choice, str))


def forced_tool_schema(request: ChatCompletionRequest) -> str | None:
    """The JSON schema text the reply must match, or None when the tool choice forces nothing."""
    choice = request.tool_choice
    if not request.tools or not is_forced(choice):
        return None
    if choice == "required":
        return json.dumps(_calls_schema(request.tools, at_most_one=request.parallel_tool_calls
                                        is False))
    named = [tool for tool in request.tools if tool.function.name == choice.function.name]
    return json.dumps(arguments_schema(named[0]))


def arguments_schema(tool: ToolDefinition) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else NO_ARGUMENTS


def _calls_schema(tools: list[ToolDefinition], at_most_one: bool) -> dict[str, Any]:
    one_call = [{"type": "object",
                 "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                "parameters": arguments_schema(tool)},
                 "required": ["name", "parameters"], "additionalProperties": False}
                for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_call}}
    if at_most_one:
        schema["maxItems"] = 1
    return schema


class NamedFunctionReader:
    """The whole reply is the named function's arguments."""

    def __init__(self, function_name: str):
        self.name = f"named:{function_name}"
        self.function_name = function_name

    def parse(self, text: str) -> ParsedOutput:
        return ParsedOutput(None, [ParsedToolCall(self.function_name, text.strip())])

    def stream(self) -> _NamedStream:
        return _NamedStream(self.function_name)


class _NamedStream:
    """Nothing is released until the reply ends: the call goes out whole, as other calls do."""

    def __init__(self, function_name: str):
        self.function_name = function_name
        self.text = ""

    def feed(self, text: str) -> StreamDelta:
        self.text += text
        return StreamDelta()

    def finish(self) -> StreamDelta:
        return StreamDelta(tool_calls=[ParsedToolCall(self.function_name, self.text.strip())])


class RequiredCallsReader:
    """The reply is a JSON array of `{"name", "parameters"}` calls."""

    name = "required"

    def parse(self, text: str) -> ParsedOutput:
        stream = self.stream()
        out = stream.feed(text) + stream.finish()
        return ParsedOutput(out.content or None, out.tool_calls)

    def stream(self) -> _CallArrayStream:
        return _CallArrayStream()


class _CallArrayStream:
    """Each element of the array goes out as a call as soon as its JSON object is complete."""

    def __init__(self) -> None:
        self.text = ""            # everything fed
        self.pending = ""         # after the opening bracket, not yet read as calls
        self.is_open = False      # the opening bracket was seen
        self.is_broken = False    # the text is not an array of calls: it is content
        self.num_calls = 0

    def feed(self, text: str) -> StreamDelta:
        self.text += text
        self.pending += text
        if not self.is_broken and not self.is_open:
            self._open()
        if self.is_broken or not self.is_open:
            return StreamDelta()
        return StreamDelta(tool_calls=self._complete_calls())

    def finish(self) -> StreamDelta:
        # A reply cut short: the calls already out stand; with none, the text is content.
        if self.num_calls == 0:
            return StreamDelta(self.text)
        return StreamDelta()

    def _open(self) -> None:
        body = self.pending.lstrip()
        if not body:
            return
        if body[0] != "[":
            self.is_broken = True
            return
        self.pending, self.is_open = body[1:], True

    def _complete_calls(self) -> list[ParsedToolCall]:
        calls = []
        while True:
            position = _skip_separators(self.pending)
            try:
                value, end = _DECODER.raw_decode(self.pending, position)
            except json.JSONDecodeError:
                self.pending = self.pending[position:]
                return calls     # incomplete so far, or the closing bracket
            call = call_from_json(value)
            if call is None:
                self.is_broken = True
                return calls
            calls.append(call)
            self.num_calls += 1
            self.pending = self.pending[end:]


def _skip_separators(text: str) -> int:
    position = 0
    while position < len(text) and (text[position].isspace() or text[position] == ","):
        position += 1
    return position
