"""Admission control: the pure book with exact counts, then both APIs of an in-process frontend held
at their limit: the next request gets 503 + Retry-After (gRPC: UNAVAILABLE + retry-after), health
and metrics still answer at once, and places free up when streams end."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc
from tandem.frontend.admission import AdmissionBook, AdmissionConfig
from tests.frontend.inprocess import InProcessFrontend

COMPLETIONS = "/v1/completions"


def test_book_counts_requests_and_the_prefill_backlog():
    book = AdmissionBook(AdmissionConfig(max_concurrent_requests=3, max_queued_prompt_tokens=100))
    assert book.admit("a", 60) is None and book.admit("b", 40) is None
    assert "backlog is 100 prompt tokens" in book.admit("c", 1)
    book.on_first_token("a")
    assert (book.num_requests, book.num_queued_tokens) == (2, 40)
    assert book.admit("c", 60) is None
    assert book.is_full and "limit of 3 concurrent requests" in book.admit("d", 1)
    for request_id in ("a", "b", "c"):
        book.on_finished(request_id)
    assert (book.num_requests, book.num_queued_tokens, book.queued_tokens) == (0, 0, {})
    assert book.num_refused == 2


def test_a_request_larger_than_the_backlog_limit_is_admitted_alone():
    book = AdmissionBook(AdmissionConfig(max_queued_prompt_tokens=100))
    assert book.admit("big", 500) is None
    assert book.admit("next", 1) is not None


def test_zero_means_no_limit_and_negative_limits_are_refused():
    book = AdmissionBook(AdmissionConfig(max_concurrent_requests=0, max_queued_prompt_tokens=0))
    assert all(book.admit(str(i), 10**6) is None for i in range(1000))
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        AdmissionConfig(max_concurrent_requests=-1)


LIMIT = 2


@pytest.fixture(scope="module")
def frontend() -> Iterator[InProcessFrontend]:
    frontend = InProcessFrontend(admission=AdmissionConfig(max_concurrent_requests=LIMIT,
                                                           retry_after_s=3)).start()
    yield frontend
    frontend.stop()


def test_requests_past_the_limit_get_503_with_retry_after(frontend):
    frontend.pipeline.reset()
    frontend.pipeline.endless, frontend.pipeline.delay_s = True, 0.01
    body = {"prompt": "hold", "stream": True, "max_tokens": 50}
    with httpx.Client(base_url=frontend.url, timeout=10) as http:
        streams = [http.stream("POST", COMPLETIONS, json=body) for _ in range(LIMIT)]
        try:
            for stream in streams:
                assert stream.__enter__().status_code == 200
            assert frontend.gate.book.num_requests == LIMIT
            refused = http.post(COMPLETIONS, json={"prompt": "one more"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
            error = refused.json()["error"]
            assert error["code"] == "server_overloaded" and f"limit of {LIMIT}" in error["message"]
            assert_grpc_refused(frontend)
            for path in ("/health", "/metrics", "/v1/models"):
                started = time.perf_counter()
                assert http.get(path).status_code == 200
                assert time.perf_counter() - started < 0.5
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    wait_until(lambda: frontend.gate.book.num_requests == 0)
    frontend.pipeline.endless = False
    with httpx.Client(base_url=frontend.url, timeout=10) as http:
        assert http.post(COMPLETIONS, json={"prompt": "again", "max_tokens": 2}).status_code == 200
    assert frontend.gate.book.num_requests == 0


def assert_grpc_refused(frontend: InProcessFrontend) -> None:
    with grpc.insecure_channel(frontend.grpc_address) as channel:
        call = pbgrpc.GenerationStub(channel).Generate(pb.GenerateRequest(text="one more"), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"limit of {LIMIT} concurrent requests" in err.value.details()
    assert ("retry-after", "3") in tuple(err.value.trailing_metadata())


def test_the_prefill_backlog_is_released_at_the_first_token(frontend):
    frontend.pipeline.reset()
    with httpx.Client(base_url=frontend.url, timeout=10) as http:
        with http.stream("POST", COMPLETIONS, json={"prompt": "hold", "stream": True}) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: {"))
            assert json.loads(first.removeprefix("data: "))["choices"][0]["text"]
    wait_until(lambda: frontend.gate.book.num_requests == 0)
    assert frontend.gate.book.num_queued_tokens == 0


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
