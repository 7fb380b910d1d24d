"""Streamed chunks that carry text alone are sent from a template: the bytes must be those the
pydantic bodies give, for any text."""

from __future__ import annotations

import json

import pytest

from tandem.frontend.openai_outputs import ChatFormatter, CompletionFormatter
from tandem.frontend.openai_sse import TextEventTemplate, sse_event
from tandem.frontend.types import GenerateChunk

TEXTS = ["hello", " world", "", "\"quoted\"\\", "line\nbreak\ttab", "é中文🙂", "\x00\x1f\u2028",
         "</script>", "data: [DONE]\n\n"]


def _formatter(kind, **kwargs):
    return kind("cmpl-abc", "model \"x\"", 7, None, lambda token_id: str(token_id), 2, **kwargs)


def _slow_event(formatter, chunk: GenerateChunk) -> bytes | None:
    body = formatter.stream_body(formatter.add(chunk))
    return None if body is None else sse_event(body)


@pytest.mark.parametrize("kind", [CompletionFormatter, ChatFormatter])
def test_text_events_are_the_bytes_of_the_pydantic_bodies(kind):
    fast, slow = _formatter(kind), _formatter(kind)
    fast.created = slow.created
    for k, text in enumerate(TEXTS):
        chunk = GenerateChunk([k], text)
        assert fast.stream_event(chunk) == _slow_event(slow, chunk), text
    end = GenerateChunk([99], "!", "stop", 99)
    assert fast.stream_event(end) == _slow_event(slow, end)
    assert fast.text == slow.text == "".join(TEXTS) + "!"
    assert fast.num_completion_tokens == slow.num_completion_tokens == len(TEXTS) + 1
    assert fast.finish_reason == "stop" and fast.stop_reason == 99


def test_a_text_event_parses_as_the_chunk():
    formatter = _formatter(ChatFormatter)
    event = formatter.stream_event(GenerateChunk([1], "héllo\n"))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    body = json.loads(event[len(b"data: "):])
    assert body["object"] == "chat.completion.chunk" and body["id"] == "cmpl-abc"
    assert body["choices"] == [{"index": 2, "delta": {"role": None, "content": "héllo\n",
                                                      "tool_calls": None},
                                "logprobs": None, "finish_reason": None, "stop_reason": None}]


def test_echo_goes_out_with_the_first_chunk_then_text_alone():
    formatter = _formatter(CompletionFormatter, echo_text="prompt ")
    first = json.loads(formatter.stream_event(GenerateChunk([1], "a"))[6:])
    second = json.loads(formatter.stream_event(GenerateChunk([2], "b"))[6:])
    assert first["choices"][0]["text"] == "prompt a"
    assert second["choices"][0]["text"] == "b"


def test_no_template_when_the_text_is_not_in_the_body_once():
    assert TextEventTemplate.of(lambda text: {"a": text, "b": text}) is None
    assert TextEventTemplate.of(lambda text: {"a": 1}) is None
    template = TextEventTemplate.of(lambda text: {"a": text, "b": None})
    assert template.event("x\"y") == sse_event({"a": "x\"y", "b": None})
