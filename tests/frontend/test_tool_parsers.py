"""The tool-call parsers on fixed model replies: whole, and streamed in pieces of every size (the
stream must say what the whole parse says, and never send a parsed call's markup as content)."""

from __future__ import annotations

import pytest

from tandem.frontend.tool_parsers import (HermesParser, Llama3JsonParser, ParsedOutput,
                                          ParsedToolCall, StreamDelta, detect_parser, held_back,
                                          make_parser)

WEATHER = ParsedToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}')
TIME = ParsedToolCall("get_time", '{"zone": "CET"}')


def streamed(parser, text: str, piece: int) -> StreamDelta:
    stream = parser.stream()
    total = StreamDelta()
    for start in range(0, len(text), piece):
        total = total + stream.feed(text[start:start + piece])
    return total + stream.finish()


LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     ParsedOutput(None, [WEATHER])),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     ParsedOutput(None, [WEATHER])),
    ('  {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {"zone": "CET"}}',
     ParsedOutput(None, [WEATHER, TIME])),
    ("It is sunny in Paris.", ParsedOutput("It is sunny in Paris.", [])),
    ('{"answer": 42}', ParsedOutput('{"answer": 42}', [])),               # JSON, but no call
    ('{"name": "get_time", "parameters": {"zone": ', ParsedOutput(
        '{"name": "get_time", "parameters": {"zone": ', [])),            # cut off
    ('{"name": "get_time", "parameters": "{\\"zone\\": \\"CET\\"}"}', ParsedOutput(None, [TIME])),
]

HERMES_CASES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
     '</tool_call>', ParsedOutput(None, [WEATHER])),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
     '{"zone": "CET"}}\n</tool_call>', ParsedOutput("Let me check.", [WEATHER, TIME])),
    ('<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}',      # never closed
     ParsedOutput(None, [TIME])),
    ("Sunny, 21 degrees.", ParsedOutput("Sunny, 21 degrees.", [])),
    ("<tool_call>not json</tool_call>", ParsedOutput("<tool_call>not json</tool_call>", [])),
    ("a < b <tool", ParsedOutput("a < b <tool", [])),
]


@pytest.mark.parametrize("text, expected", LLAMA_CASES)
def test_llama3_json_parse(text, expected):
    assert Llama3JsonParser().parse(text) == expected


@pytest.mark.parametrize("text, expected", HERMES_CASES)
def test_hermes_parse(text, expected):
    assert HermesParser().parse(text) == expected


@pytest.mark.parametrize("parser, text, expected",
                         [(Llama3JsonParser(), t, e) for t, e in LLAMA_CASES]
                         + [(HermesParser(), t, e) for t, e in HERMES_CASES])
@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_stream_matches_parse(parser, text, expected, piece):
    delta = streamed(parser, text, piece)
    assert delta.tool_calls == expected.tool_calls
    if expected.tool_calls:
        assert delta.content.strip() == (expected.content or "")
        assert "<tool_call>" not in delta.content and '"name"' not in delta.content
    else:
        assert delta.content == expected.content


def test_hermes_stream_sends_content_before_the_call_and_the_call_when_it_closes():
    stream = HermesParser().stream()
    assert stream.feed("Checking <tool") == StreamDelta("Checking ")       # "<tool" held back
    assert stream.feed('_call>{"name": "get_time", ') == StreamDelta()
    assert stream.feed('"arguments": {"zone": "CET"}}</tool_call>') == StreamDelta(tool_calls=[TIME])
    assert stream.finish() == StreamDelta()


def test_llama3_stream_sends_each_call_when_its_json_completes():
    stream = Llama3JsonParser().stream()
    assert stream.feed("<|python_") == StreamDelta()
    assert stream.feed('tag|>{"name": "get_time", "parameters": {"zone": "CET"}') == StreamDelta()
    assert stream.feed("};") == StreamDelta(tool_calls=[TIME])
    assert stream.finish() == StreamDelta()


def test_llama3_stream_streams_plain_content_at_once():
    stream = Llama3JsonParser().stream()
    assert stream.feed("  ") == StreamDelta()
    assert stream.feed("Hi") == StreamDelta("  Hi")
    assert stream.feed(" there") == StreamDelta(" there")


def test_held_back():
    assert held_back("abc <tool_c", "<tool_call>") == 7
    assert held_back("abc", "<tool_call>") == 0
    assert held_back("<", "<tool_call>") == 1


LLAMA_TEMPLATE_EXCERPT = ('{{- \'{"name": "\' + tool_call.name + \'", \' }}{{- \'"parameters": \' }}'
                          "{%- elif message.role == \"tool\" or message.role == \"ipython\" %}")
QWEN_TEMPLATE_EXCERPT = "{{- '<tool_call>\\n{\"name\": \"' }}"


@pytest.mark.parametrize("template, expected", [
    (QWEN_TEMPLATE_EXCERPT, "hermes"),
    (LLAMA_TEMPLATE_EXCERPT, "llama3_json"),
    ("{{ '<|python_tag|>' + tool_call.name }}", "llama3_json"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", None),
    (None, None),
])
def test_detect_parser(template, expected):
    assert detect_parser(template) == expected


def test_make_parser_names_the_choices():
    assert make_parser("hermes").name == "hermes"
    with pytest.raises(ValueError, match=r"\['hermes', 'llama3_json'\], got 'mistral'"):
        make_parser("mistral")
