"""The clients' pure parts: SSE lines, which chunks carry tokens, and the request bodies."""

from __future__ import annotations

import pytest

from tandem.bench.clients import make_client
from tandem.bench.openai_chat_client import chat_body, chat_chunk_token_count
from tandem.bench.grpc_client import generate_request, grpc_target
from tandem.bench.openai_client import (SSEEventSplitter, StreamError, chunk_token_count,
                                        chunk_usage, completion_body, parse_sse_data)
from tandem.bench.records import BenchRequest


def test_parse_sse_data():
    assert parse_sse_data('data: {"a": 1}') == '{"a": 1}'
    assert parse_sse_data("data:[DONE]") == "[DONE]"
    assert parse_sse_data(": keep-alive") is None
    assert parse_sse_data("") is None


def test_sse_events_split_from_pieces_cut_anywhere():
    stream = (b'data: {"a": 1}\n\n: keep-alive\n\ndata: {"b": 2}\r\n\r\n'
              b'event: x\ndata: one\ndata: two\n\ndata:[DONE]\n\n')
    expected = ['{"a": 1}', '{"b": 2}', "one\ntwo", "[DONE]"]
    assert SSEEventSplitter().feed(stream) == expected
    for cut in range(1, len(stream)):
        splitter = SSEEventSplitter()
        assert splitter.feed(stream[:cut]) + splitter.feed(stream[cut:]) == expected, cut
    bytewise = SSEEventSplitter()
    assert [p for i in range(len(stream)) for p in bytewise.feed(stream[i:i + 1])] == expected


def test_sse_event_without_its_blank_line_is_held_back():
    splitter = SSEEventSplitter()
    assert splitter.feed(b'data: {"a": 1}\n') == []
    assert splitter.feed(b"\n") == ['{"a": 1}']


def test_which_chunks_carry_tokens():
    assert chunk_token_count({"choices": [{"text": "hi", "finish_reason": None}]}) == 1
    assert chunk_token_count({"choices": [{"text": "end", "finish_reason": "length"}]}) == 1
    # Text held back by the detokenizer still means a token was generated.
    assert chunk_token_count({"choices": [{"text": "", "finish_reason": None}]}) == 1
    assert chunk_token_count({"choices": [{"text": "", "finish_reason": "length"}]}) == 0
    assert chunk_token_count({"choices": [], "usage": {"prompt_tokens": 3}}) == 0
    with pytest.raises(StreamError):
        chunk_token_count({"error": {"message": "boom"}})


def test_chunk_usage_reads_cached_tokens():
    usage = {"prompt_tokens": 40, "completion_tokens": 8,
             "prompt_tokens_details": {"cached_tokens": 32}}
    assert chunk_usage({"choices": [], "usage": usage}) == (40, 8, 32)
    assert chunk_usage({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2,
                                                 "prompt_tokens_details": None}}) == (4, 2, 0)
    assert chunk_usage({"choices": [{"text": "x"}], "usage": None}) is None


def test_completion_body_streams_with_usage_and_ignores_eos():
    body = completion_body(BenchRequest((17, 18, 19), output_len=5), "m", temperature=0.0)
    assert body == {"model": "m", "prompt": [17, 18, 19], "max_tokens": 5, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    text_body = completion_body(BenchRequest((), 5, prompt_text="hello"), "m", 0.0)
    assert text_body["prompt"] == "hello"


def test_generate_request_fields():
    message = generate_request(BenchRequest((17, 18), output_len=9), "", temperature=0.5)
    assert list(message.token_ids.ids) == [17, 18]
    assert message.sampling.max_tokens == 9 and message.sampling.ignore_eos
    assert message.sampling.temperature == 0.5
    text = generate_request(BenchRequest((), 3, prompt_text="hi"), "m", 0.0)
    assert text.WhichOneof("prompt") == "text" and text.model == "m"


def test_grpc_target_strips_a_scheme():
    assert grpc_target("http://127.0.0.1:50051/") == "127.0.0.1:50051"
    assert grpc_target("127.0.0.1:50051") == "127.0.0.1:50051"


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="--backend"):
        make_client("carrier-pigeon", None, None, 1.0, 0.0)


def test_chat_chunks_count_content_not_the_opening_role():
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    assert chat_chunk_token_count(role) == 0
    assert chat_chunk_token_count(
        {"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}) == 1
    assert chat_chunk_token_count(
        {"choices": [{"delta": {"content": "end"}, "finish_reason": "stop"}]}) == 1
    # A held-back token: no content, no role, no finish reason.
    assert chat_chunk_token_count({"choices": [{"delta": {}, "finish_reason": None}]}) == 1
    assert chat_chunk_token_count({"choices": [{"delta": {}, "finish_reason": "length"}]}) == 0
    assert chat_chunk_token_count({"choices": [], "usage": {"prompt_tokens": 3}}) == 0
    with pytest.raises(StreamError):
        chat_chunk_token_count({"error": {"message": "boom"}})


def test_chat_body_sends_one_user_message_and_needs_text():
    body = chat_body(BenchRequest((17, 18), output_len=6, prompt_text="hello"), "m", 0.5)
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hello"}],
                    "max_completion_tokens": 6, "temperature": 0.5, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
    with pytest.raises(ValueError, match="--tokenizer"):
        chat_body(BenchRequest((17, 18), output_len=6), "m", 0.5)
    assert type(make_client("openai-chat", None, "m", 1.0, 0.0)).__name__ == "OpenAIChatClient"
