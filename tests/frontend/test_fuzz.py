"""Fuzzing both public APIs of an in-process frontend with hypothesis: raw bodies and typed fields
over HTTP (httpx and the official `openai` client), messages and raw bytes over gRPC. A client's
mistake must never be a 5xx (gRPC: never UNKNOWN or INTERNAL), no call may hang, and the server
must be healthy, with an empty admission book, afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tandem.api.v1 import generation_pb2 as pb  # noqa: E402
from tandem.api.v1 import generation_pb2_grpc as pbgrpc  # noqa: E402
from tests.frontend.inprocess import InProcessFrontend  # noqa: E402
from tests.frontend.test_openai_api import MODEL  # noqa: E402

FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TIMEOUT_S = 10   # a call slower than this counts as a hang
GRPC_CLIENT_MISTAKE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.NOT_FOUND}   # a model that is not served

# Text with everything JSON can carry: lone surrogates, controls, astral characters.
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
big_ints = st.one_of(st.integers(-3, 70), st.integers(-(2**70), 2**70),
                     st.sampled_from([2**31, 2**32, 2**63, 2**64 - 1, -(2**63) - 1]))
# NaN and infinity only reach the server in raw bodies: JSON has no literal for them, and the
# `openai` client refuses to send them.
finite = st.floats(allow_nan=False, allow_infinity=False)
floats = st.one_of(finite, st.floats(0, 2))
json_scalars = st.one_of(st.none(), st.booleans(), big_ints, floats, texts)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "stream",
          "stream_options", "logprobs", "top_logprobs", "n", "echo", "response_format", "user"]
field_values = {
    "prompt": st.one_of(texts, st.lists(big_ints, max_size=8), json_values),
    "messages": st.one_of(st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
         "content": st.one_of(texts, json_values)}), max_size=3), json_values),
    "stop": st.one_of(texts, st.lists(texts, max_size=4), json_values),
    "stop_token_ids": st.one_of(st.lists(big_ints, max_size=4), json_values),
}
bodies = st.fixed_dictionaries({}, optional={
    name: field_values.get(name, st.one_of(json_scalars, json_values)) for name in FIELDS})


@pytest.fixture(scope="module")
def frontend() -> Iterator[InProcessFrontend]:
    frontend = InProcessFrontend().start()
    yield frontend
    assert_healthy(frontend)
    frontend.stop()


@pytest.fixture(scope="module")
def http(frontend) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=frontend.url, timeout=TIMEOUT_S) as http:
        yield http


def assert_client_mistake_or_success(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"] in ("invalid_request_error", "NotFoundError")


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies)
def test_http_json_bodies(http, path, body):
    response = http.post(path, json=body)   # ensure_ascii: lone surrogates travel as \ud800
    assert_client_mistake_or_success(response)


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.one_of(st.binary(max_size=200), st.builds(
           lambda head, tail: head + tail, st.sampled_from([b'{"prompt": ', b'{"messages": [', b"{"]),
           st.binary(max_size=60))))
def test_http_raw_bytes(http, path, body):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert_client_mistake_or_success(response)


@FUZZ
@given(prompt=st.one_of(texts, st.lists(st.integers(-5, 3000), min_size=1, max_size=8)),
       max_tokens=st.one_of(st.none(), big_ints), temperature=st.one_of(st.none(), finite),
       top_p=st.one_of(st.none(), finite), seed=st.one_of(st.none(), big_ints),
       stop=st.one_of(st.none(), texts, st.lists(texts, max_size=3)),
       extra=st.fixed_dictionaries({}, optional={"top_k": big_ints, "min_p": finite,
                                                 "stop_token_ids": st.lists(big_ints, max_size=3)}),
       stream=st.booleans())
def test_openai_client(frontend, prompt, max_tokens, temperature, top_p, seed, stop, extra, stream):
    client = openai.OpenAI(base_url=frontend.url + "/v1", api_key="x", max_retries=0,
                           timeout=TIMEOUT_S)
    try:
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                        temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                                        stream=stream, extra_body=extra)
        if stream:
            list(out)
    except openai.APIStatusError as exc:
        assert exc.status_code < 500, exc.message


sampling_options = st.builds(
    pb.SamplingOptions,
    max_tokens=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    temperature=st.one_of(st.none(), st.floats(width=32)),
    top_p=st.one_of(st.none(), st.floats(width=32)),
    top_k=st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
    min_p=st.one_of(st.none(), st.floats(width=32)),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    stop=st.lists(st.text(max_size=20), max_size=4),
    stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=4),
    ignore_eos=st.booleans(),
    logprobs=st.one_of(st.none(), st.integers(0, 2**32 - 1)))
grpc_requests = st.builds(
    pb.GenerateRequest, model=st.one_of(st.just(""), st.just(MODEL), st.text(max_size=10)),
    text=st.one_of(st.none(), st.text(max_size=40)),
    token_ids=st.one_of(st.none(), st.builds(pb.TokenIds, ids=st.lists(
        st.integers(0, 2**32 - 1), max_size=8))),
    sampling=sampling_options, request_id=st.text(max_size=10))


@pytest.fixture(scope="module")
def channel(frontend) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(frontend.grpc_address) as channel:
        yield channel


@FUZZ
@given(request=grpc_requests)
def test_grpc_messages(channel, request):
    stub = pbgrpc.GenerationStub(channel)
    try:
        responses = list(stub.Generate(request, timeout=TIMEOUT_S))
        assert responses[-1].finish_reason in ("stop", "length")
    except grpc.RpcError as err:
        assert err.code() in GRPC_CLIENT_MISTAKE, (err.code(), err.details())


@FUZZ
@given(data=st.one_of(st.binary(max_size=120), grpc_requests.map(
    lambda r: r.SerializeToString()).flatmap(
    lambda good: st.integers(0, max(len(good) - 1, 0)).map(lambda cut: good[:cut] + b"\xff"))))
def test_grpc_raw_bytes(channel, data):
    call = channel.unary_stream("/tandem.v1.Generation/Generate")
    try:
        list(call(data, timeout=TIMEOUT_S))
    except grpc.RpcError as err:
        assert err.code() in GRPC_CLIENT_MISTAKE, (err.code(), err.details())


def assert_healthy(frontend: InProcessFrontend) -> None:
    with httpx.Client(base_url=frontend.url, timeout=5) as http:
        assert http.get("/health").status_code == 200
        response = http.post("/v1/completions", json={"prompt": "healthy?", "max_tokens": 2})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    assert frontend.gate.book.num_requests == 0 and frontend.gate.book.num_queued_tokens == 0
