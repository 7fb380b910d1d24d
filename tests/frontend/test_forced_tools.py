"""forced_tools on fixed strings: the schema a required or named tool_choice holds the reply to, and
how such replies (whole, streamed, cut short) become calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tandem.frontend.forced_tools import (NO_ARGUMENTS, NamedFunctionReader, RequiredCallsReader,
                                          forced_tool_schema, is_forced)
from tandem.frontend.openai_protocol import ChatCompletionRequest
from tandem.frontend.tool_parsers import ParsedToolCall

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}   # no parameters


def request(tool_choice, **extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER, CLOCK], "tool_choice": tool_choice, **extra})


def streamed(reader, pieces: list[str]) -> tuple[str, list[ParsedToolCall]]:
    stream = reader.stream()
    content, calls = "", []
    for piece in pieces:
        delta = stream.feed(piece)
        content, calls = content + delta.content, calls + delta.tool_calls
    delta = stream.finish()
    return content + delta.content, calls + delta.tool_calls


def test_only_required_and_named_choices_force_a_schema():
    assert [is_forced(c) for c in (None, "none", "auto", "required")] == [False, False, False, True]
    assert forced_tool_schema(request("auto")) is None
    assert forced_tool_schema(request("none")) is None
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert json.loads(forced_tool_schema(request(named))) == WEATHER["function"]["parameters"]
    clock = {"type": "function", "function": {"name": "get_time"}}
    assert json.loads(forced_tool_schema(request(clock))) == NO_ARGUMENTS


def test_required_schema_accepts_calls_of_the_tools_only():
    schema = json.loads(forced_tool_schema(request("required")))
    good = [{"name": "get_weather", "parameters": {"city": "Rome"}},
            {"name": "get_time", "parameters": {}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"city": "Oslo"}}],
                [{"name": "get_time", "parameters": {"zone": "CET"}}],
                [{"name": "other", "parameters": {}}], [{"name": "get_time"}],
                {"name": "get_time", "parameters": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert "maxItems" not in schema
    one = json.loads(forced_tool_schema(request("required", parallel_tool_calls=False)))
    assert one["maxItems"] == 1


def test_required_reply_whole_and_streamed_reads_the_same():
    text = ('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
            '{"name": "get_time", "parameters": {}}]')
    expected = [ParsedToolCall("get_weather", '{"city": "Paris"}'), ParsedToolCall("get_time", "{}")]
    whole = RequiredCallsReader().parse(text)
    assert (whole.content, whole.tool_calls) == (None, expected)
    assert streamed(RequiredCallsReader(), list(text)) == ("", expected)


def test_required_stream_sends_each_call_once_complete():
    stream = RequiredCallsReader().stream()
    assert stream.feed('[{"name": "get_time", "parameters": {}').tool_calls == []
    assert stream.feed('}, {"name": "get_time"').tool_calls == [ParsedToolCall("get_time", "{}")]
    assert stream.feed(', "parameters": {}}]').tool_calls == [ParsedToolCall("get_time", "{}")]
    assert (stream.finish().content, stream.finish().tool_calls) == ("", [])


def test_required_reply_cut_short_keeps_complete_calls_or_becomes_content():
    cut = '[{"name": "get_time", "parameters": {}}, {"name": "get_wea'
    parsed = RequiredCallsReader().parse(cut)
    assert (parsed.content, parsed.tool_calls) == (None, [ParsedToolCall("get_time", "{}")])
    nothing = '[{"name": "get_wea'
    assert RequiredCallsReader().parse(nothing).content == nothing
    assert RequiredCallsReader().parse(nothing).tool_calls == []
    assert RequiredCallsReader().parse("prose").content == "prose"


def test_named_reply_is_the_arguments_of_one_call():
    reader = NamedFunctionReader("get_weather")
    whole = reader.parse(' {"city": "Rome"}')
    assert (whole.content, whole.tool_calls) == (None, [ParsedToolCall("get_weather",
                                                                       '{"city": "Rome"}')])
    assert streamed(reader, ['{"ci', 'ty": "Rome"}']) == (
        "", [ParsedToolCall("get_weather", '{"city": "Rome"}')])
