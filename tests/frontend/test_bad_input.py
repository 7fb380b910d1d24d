"""Client mistakes that once answered 5xx (issue 13, "Bad input"), through both public APIs of an
in-process frontend: each is a 4xx (HTTP) or INVALID_ARGUMENT / RESOURCE_EXHAUSTED (gRPC) naming
the field and the limit, the pipeline never sees the request, and the connection keeps serving."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc
from tandem.frontend.request_rules import RequestLimits
from tests.frontend.inprocess import InProcessFrontend
from tests.frontend.test_openai_api import MAX_MODEL_LEN, TOKENIZER

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
LIMITS = RequestLimits(max_request_bytes=4 * 2**20)


@pytest.fixture(scope="module")
def frontend() -> Iterator[InProcessFrontend]:
    frontend = InProcessFrontend(LIMITS).start()
    yield frontend
    frontend.stop()


@pytest.fixture
def http(frontend) -> Iterator[httpx.Client]:
    frontend.pipeline.reset()
    with httpx.Client(base_url=frontend.url, timeout=10) as http:
        yield http


@pytest.fixture
def stub(frontend) -> Iterator[pbgrpc.GenerationStub]:
    frontend.pipeline.reset()
    with grpc.insecure_channel(frontend.grpc_address) as channel:
        yield pbgrpc.GenerationStub(channel)


def post_raw(http: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return http.post(path, content=body, headers={"content-type": "application/json"})


def assert_error(response: httpx.Response, status: int, param: str | None, *phrases: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    for phrase in phrases:
        assert phrase in error["message"], error["message"]


def assert_still_serving(http: httpx.Client) -> None:
    response = http.post(COMPLETIONS, json={"prompt": "still there?", "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


# ---- integers past the wire's range ----

@pytest.mark.parametrize("field, value, phrase", [
    ("seed", 2**64 - 1, f"[{-2**63}, {2**63 - 1}]"),
    ("seed", 2**63, f"[{-2**63}, {2**63 - 1}]"),
    ("seed", -(2**63) - 1, "seed must be in"),
    ("top_k", 2**31, f"{2**31 - 1}]"),
    ("stop_token_ids", [1, 2**32], f"[0, {2**32 - 1}]"),
])
def test_integers_past_the_wire_are_400(http, frontend, field, value, phrase):
    assert_error(http.post(COMPLETIONS, json={"prompt": "hi", field: value}), 400, field, phrase)
    assert frontend.pipeline.requests == []
    assert_still_serving(http)


def test_largest_wire_integers_are_accepted(http, frontend):
    body = {"prompt": "hi", "seed": 2**63 - 1, "top_k": 2**31 - 1, "stop_token_ids": [2**32 - 1],
            "max_tokens": 1}
    assert http.post(COMPLETIONS, json=body).status_code == 200
    params = frontend.pipeline.requests[-1].params
    assert (params.seed, params.top_k, params.stop_token_ids) == (2**63 - 1, 2**31 - 1, [2**32 - 1])


def test_floats_past_float32_are_400(http):
    assert_error(http.post(COMPLETIONS, json={"prompt": "hi", "temperature": 1e39}), 400,
                 "temperature", "finite number within float32's range")


# ---- lone surrogates ----

@pytest.mark.parametrize("path, body, param", [
    (COMPLETIONS, b'{"prompt": "a\\ud800b"}', "prompt"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x\\udfff"}]}', "messages"),
    (COMPLETIONS, b'{"prompt": "hi", "stop": ["ok", "\\ud83d"]}', "stop"),
    (COMPLETIONS, b'{"prompt": "hi", "model": "\\udc80"}', "model"),
    (COMPLETIONS, b'{"prompt": "hi", "\\ud800": 1}', "\\ud800"),
])
def test_lone_surrogates_are_400_and_the_connection_stays_usable(http, frontend, path, body, param):
    response = post_raw(http, path, body)
    assert_error(response, 400, param, "lone UTF-16 surrogate")
    assert response.headers.get("connection") != "close"
    assert frontend.pipeline.requests == []
    assert_still_serving(http)   # same client, same keep-alive connection


# ---- sizes ----

def test_ten_megabyte_prompt_is_413_before_reading_it_all(http, frontend):
    started = time.perf_counter()
    response = http.post(COMPLETIONS, json={"prompt": "x" * 10_000_000})
    assert time.perf_counter() - started < 5
    assert_error(response, 413, None, f"limit of {LIMITS.max_request_bytes} bytes")
    assert response.json()["error"]["code"] == "request_too_large"
    assert frontend.pipeline.requests == []


def test_body_without_length_is_cut_at_the_limit(http):
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(6):
            yield b"y" * 2**20

    response = http.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, None, f"{LIMITS.max_request_bytes} bytes")


def test_ten_megabyte_stop_list_is_413_naming_the_limit(http):
    response = http.post(COMPLETIONS, json={"prompt": "hi", "stop": ["s" * 1000] * 10_000})
    assert_error(response, 413, None, f"limit of {LIMITS.max_request_bytes} bytes")


@pytest.mark.parametrize("stop, phrase", [
    (["s" * 4000] * 100, "holds 100 strings; the limit is 64"),
    (["s" * 4000] * 3, "12000 characters long together; the limit is 8192"),
])
def test_stop_lists_past_the_limits_are_400(http, stop, phrase):
    assert_error(http.post(COMPLETIONS, json={"prompt": "hi", "stop": stop}), 400, "stop", phrase)


def test_prompt_longer_than_the_context_can_hold_is_refused_before_tokenizing(http, frontend,
                                                                              monkeypatch):
    calls = []
    monkeypatch.setattr(TOKENIZER, "encode", lambda *a, **k: calls.append(a) or [5])
    limit = frontend.rules.max_prompt_chars
    assert limit == MAX_MODEL_LEN * max(len(t) for t in TOKENIZER.get_vocab())
    for path, body, param in [
        (COMPLETIONS, {"prompt": "z" * (limit + 1)}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": "z" * limit},
                             {"role": "user", "content": "z"}]}, "messages"),
    ]:
        assert_error(http.post(path, json=body), 400, param, f"limit of {limit} characters")
    assert calls == []


# ---- gRPC ----

def grpc_error(stub, request, timeout: float = 10) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, timeout=timeout))
    return err.value


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_grpc_non_finite_floats_are_invalid_argument(stub, frontend, field, value):
    error = grpc_error(stub, pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(**{field: value})))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field} must be a finite number")
    assert frontend.pipeline.requests == []


@pytest.mark.parametrize("data, phrase", [
    (b"\xff\xff\xff\xff", "Wire format was corrupt"),
    (b"\x12\x02\xff\xfe", "bad UTF-8"),   # field 2 (text) holding invalid UTF-8
])
def test_grpc_garbage_bytes_are_invalid_argument(frontend, data, phrase):
    with grpc.insecure_channel(frontend.grpc_address) as channel:
        call = channel.unary_stream("/tandem.v1.Generation/Generate")
        with pytest.raises(grpc.RpcError) as err:
            list(call(data, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid tandem.v1.GenerateRequest" in err.value.details()
    assert phrase in err.value.details()


def test_grpc_message_past_the_limit_is_resource_exhausted(stub):
    error = grpc_error(stub, pb.GenerateRequest(text="x" * 5_000_000))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"vs. {LIMITS.max_request_bytes})" in error.details()


@pytest.mark.parametrize("sampling, body", [
    (pb.SamplingOptions(top_p=2), {"top_p": 2}),
    (pb.SamplingOptions(stop=["s" * 4000] * 100), {"stop": ["s" * 4000] * 100}),
    (pb.SamplingOptions(top_k=-5), {"top_k": -5}),
    (pb.SamplingOptions(max_tokens=1000), {"max_tokens": 1000}),
    (pb.SamplingOptions(logit_bias={99999: 1.0}), {"logit_bias": {"99999": 1.0}}),
    (pb.SamplingOptions(logit_bias={5: 500.0}), {"logit_bias": {"5": 500.0}}),
])
def test_grpc_and_http_give_the_same_message(stub, http, sampling, body):
    error = grpc_error(stub, pb.GenerateRequest(text="hi", sampling=sampling))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    response = http.post(COMPLETIONS, json={"prompt": "hi", **body})
    assert response.status_code == 400
    assert error.details() == response.json()["error"]["message"]


def test_grpc_tokenizes_on_the_tokenizer_thread(stub, monkeypatch):
    threads = []
    encode = TOKENIZER.encode
    monkeypatch.setattr(TOKENIZER, "encode",
                        lambda *a, **k: threads.append(threading.current_thread().name) or encode(*a, **k))
    responses = list(stub.Generate(pb.GenerateRequest(
        text="Hello there", sampling=pb.SamplingOptions(max_tokens=2)), timeout=10))
    assert responses[-1].usage.completion_tokens == 2
    assert len(threads) == 1 and threads[0].startswith("tandem-tokenize")


def test_grpc_prompt_checks(stub):
    for request, phrase in [
        (pb.GenerateRequest(), "no prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 4096])), "4096 is outside the vocabulary"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(10, 80)))), "70 tokens long"),
    ]:
        error = grpc_error(stub, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert phrase in error.details()


def test_unknown_model_is_404_as_vllm_answers_and_grpc_not_found(http, stub, frontend):
    for path, body in ((COMPLETIONS, {"prompt": "hi"}),
                       (CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/tokenize", {"prompt": "hi"})):
        response = http.post(path, json={"model": "other", **body})
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["message"].startswith("The model `other` does not exist.")
        assert (error["type"], error["code"], error["param"]) == ("NotFoundError", 404, "model")
    error = grpc_error(stub, pb.GenerateRequest(text="hi", model="other"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().startswith("The model `other` does not exist.")
    assert frontend.pipeline.requests == []
