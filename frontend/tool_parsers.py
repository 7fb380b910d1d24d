"""Tool calls written by a model, read back out of its text: the Llama 3 JSON format and the
Qwen / Hermes format, whole or as the text streams in.

A chat template that knows `tools` tells the model how to call them, and each model family writes a
call its own way:

- `llama3_json` (Llama 3.1, 3.2, 3.3): the whole reply is one JSON object
  `{"name": ..., "parameters": {...}}`, possibly after the `<|python_tag|>` token, several calls
  separated by `;`. A reply that does not start with `{` (after that tag) is plain content, and so
  is one that does not parse as calls: a model answering in JSON is not calling a tool.
- `hermes` (Qwen 2.5, Qwen 3, Hermes): each call is `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`, after optional content. A call whose JSON does not parse leaves the reply as it
  is, content only. A last `<tool_call>` the model never closed (it stopped at its end token) is
  still read.

Both accept `arguments` or `parameters`, whichever the model wrote. A call's arguments come back as
JSON text, as OpenAI's `function.arguments` carries them.

Streaming (`ToolCallStream`): content streams as it comes, except text that may be the start of a
call's markup, which is held back until it is known; a call is sent whole once its JSON (or its
closing tag) is complete. The raw markup of a call that parsed is never sent as content.

Everything here is pure: no I/O, no tokenizer, testable on fixed strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

PYTHON_TAG = "<|python_tag|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: str           # JSON text of the arguments object


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    content: str | None      # None: the reply was calls only
    tool_calls: list[ParsedToolCall]


@dataclass(slots=True)
class StreamDelta:
    """What one piece of streamed text releases: content to send and calls now complete."""
    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)

    def __add__(self, other: StreamDelta) -> StreamDelta:
        return StreamDelta(self.content + other.content, self.tool_calls + other.tool_calls)


class ToolCallStream(Protocol):
    def feed(self, text: str) -> StreamDelta: ...
    def finish(self) -> StreamDelta: ...


class ToolCallParser(Protocol):
    name: str

    def parse(self, text: str) -> ParsedOutput: ...
    def stream(self) -> ToolCallStream: ...


def call_from_json(value: Any) -> ParsedToolCall | None:
    """A call from a decoded JSON value, or None when it is not shaped like one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        # Some models write the arguments as JSON text already.
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` may be the start of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


# ---- Llama 3 JSON ----

class Llama3JsonParser:
    name = "llama3_json"

    def parse(self, text: str) -> ParsedOutput:
        calls = _llama3_calls(text)
        if calls is None:
            return ParsedOutput(text, [])
        return ParsedOutput(None, calls)

    def stream(self) -> ToolCallStream:
        return _Llama3Stream()


def _llama3_body(text: str) -> str | None:
    """The text after the optional python tag when it opens a JSON object, else None."""
    body = text.lstrip().removeprefix(PYTHON_TAG).lstrip()
    return body if body.startswith("{") else None


def _llama3_calls(text: str) -> list[ParsedToolCall] | None:
    body = _llama3_body(text)
    if body is None:
        return None
    calls, position = [], 0
    while position < len(body):
        try:
            value, position = _DECODER.raw_decode(body, position)
        except json.JSONDecodeError:
            return None
        call = call_from_json(value)
        if call is None:
            return None
        calls.append(call)
        position = _skip_separators(body, position)
    return calls


def _skip_separators(text: str, position: int) -> int:
    while position < len(text) and (text[position].isspace() or text[position] == ";"):
        position += 1
    return position


class _Llama3Stream:
    """Undecided until the first visible characters say content or a call; then either streams
    content or sends each call as soon as its JSON object is complete."""

    def __init__(self) -> None:
        self.text = ""          # everything fed
        self.pending = ""       # fed but not yet released
        self.mode = "undecided"  # undecided | content | calls
        self.num_calls = 0

    def feed(self, text: str) -> StreamDelta:
        self.text += text
        self.pending += text
        if self.mode == "undecided":
            self._decide()
        if self.mode == "content":
            content, self.pending = self.pending, ""
            return StreamDelta(content)
        if self.mode == "calls":
            return self._complete_calls()
        return StreamDelta()

    def finish(self) -> StreamDelta:
        if self.mode == "calls" and self.pending.strip(" \n\t;"):
            # A call that never completed: what was held back is content after all.
            return self._to_content()
        content = "" if self.mode == "calls" else self.pending
        self.pending = ""
        return StreamDelta(content)

    def _decide(self) -> None:
        start = self.pending.lstrip()
        if PYTHON_TAG.startswith(start):
            return              # whitespace, or maybe the python tag: wait
        after_tag = start.removeprefix(PYTHON_TAG).lstrip()
        if not after_tag:
            return              # the tag alone so far
        if after_tag.startswith("{"):
            self.mode, self.pending = "calls", after_tag
        else:
            self.mode = "content"

    def _complete_calls(self) -> StreamDelta:
        delta = StreamDelta()
        while True:
            position = _skip_separators(self.pending, 0)
            if position == len(self.pending):
                self.pending = ""
                return delta
            try:
                value, end = _DECODER.raw_decode(self.pending, position)
            except json.JSONDecodeError:
                self.pending = self.pending[position:]
                return delta    # incomplete so far
            call = call_from_json(value)
            if call is None:
                return delta + self._to_content()
            delta.tool_calls.append(call)
            self.num_calls += 1
            self.pending = self.pending[end:]

    def _to_content(self) -> StreamDelta:
        # Nothing was sent yet when no call was: the whole reply is content, as `parse` says.
        content = self.text if self.num_calls == 0 else self.pending
        self.mode, self.pending = "content", ""
        return StreamDelta(content)


# ---- Qwen / Hermes ----

class HermesParser:
    name = "hermes"

    def parse(self, text: str) -> ParsedOutput:
        if TOOL_CALL_START not in text:
            return ParsedOutput(text, [])
        outside, calls = [], []
        rest = text
        while TOOL_CALL_START in rest:
            before, _, rest = rest.partition(TOOL_CALL_START)
            outside.append(before)
            body, closed, rest = rest.partition(TOOL_CALL_END)
            call = _hermes_call(body)
            if call is None:
                return ParsedOutput(text, [])
            calls.append(call)
        outside.append(rest)
        content = "".join(outside).strip()
        return ParsedOutput(content or None, calls)

    def stream(self) -> ToolCallStream:
        return _HermesStream()


def _hermes_call(body: str) -> ParsedToolCall | None:
    try:
        return call_from_json(json.loads(body))
    except json.JSONDecodeError:
        return None


class _HermesStream:
    """Content streams until `<tool_call>`; each call is sent when `</tool_call>` closes it. After
    the first call, content that is only whitespace (the newlines between calls) is dropped."""

    def __init__(self) -> None:
        self.pending = ""
        self.in_call = False
        self.num_calls = 0

    def feed(self, text: str) -> StreamDelta:
        self.pending += text
        delta = StreamDelta()
        while True:
            step = self._call_step() if self.in_call else self._content_step()
            if step is None:
                return delta
            delta = delta + step

    def finish(self) -> StreamDelta:
        rest, self.pending = self.pending, ""
        if not self.in_call:
            return StreamDelta(self._visible(rest))
        self.in_call = False
        call = _hermes_call(rest)
        if call is None:
            return StreamDelta(TOOL_CALL_START + rest)
        self.num_calls += 1
        return StreamDelta(tool_calls=[call])

    def _content_step(self) -> StreamDelta | None:
        before, found, after = self.pending.partition(TOOL_CALL_START)
        if found:
            self.pending, self.in_call = after, True
            return StreamDelta(self._visible(before))
        keep = held_back(self.pending, TOOL_CALL_START)
        cut = len(self.pending) - keep
        if self.num_calls and not self.pending[:cut].strip():
            return None         # whitespace after a call: wait, it may precede another
        content, self.pending = self.pending[:cut], self.pending[cut:]
        return StreamDelta(content) if content else None

    def _call_step(self) -> StreamDelta | None:
        body, found, after = self.pending.partition(TOOL_CALL_END)
        if not found:
            return None
        self.pending, self.in_call = after, False
        call = _hermes_call(body)
        if call is None:
            return StreamDelta(TOOL_CALL_START + body + TOOL_CALL_END)
        self.num_calls += 1
        return StreamDelta(tool_calls=[call])

    def _visible(self, text: str) -> str:
        return "" if self.num_calls and not text.strip() else text


# ---- choosing one ----

PARSERS: dict[str, type] = {"llama3_json": Llama3JsonParser, "hermes": HermesParser}


def make_parser(name: str) -> ToolCallParser:
    if name not in PARSERS:
        raise ValueError(f"tool_call_parser must be one of {sorted(PARSERS)}, got {name!r}")
    return PARSERS[name]()


def detect_parser(chat_template: str | None) -> str | None:
    """The parser a chat template's own markup calls for, or None when it shows no tool format
    tandem reads. Hermes-style templates write the `<tool_call>` tag; Llama 3 templates describe
    calls as `"parameters"` JSON and answer them as the `ipython` role (3.1 adds the python tag)."""
    if not chat_template:
        return None
    if TOOL_CALL_START in chat_template:
        return "hermes"
    if PYTHON_TAG in chat_template or ("ipython" in chat_template and "parameters" in chat_template):
        return "llama3_json"
    return None
