"""The pipeline's migration, against fake workers (no processes, no sockets): a decode worker that
dies mid-stream, one that stops answering, one that drops out of the registry, a prefill worker
that dies, a client that leaves between prefill and decode. Each checks the tokens the client got,
what the retry asked for, the router's books and the registry afterwards."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.contracts.sampling_params import SamplingParams
from tandem.contracts.wire import sampling_from_proto
from tandem.contracts.worker_stats import Registration
from tandem.engine.model_info import describe_model
from tandem.engine.tokenizer import load_tokenizer
from tandem.frontend.metrics import FrontendMetrics
from tandem.frontend.pipeline import Pipeline
from tandem.frontend.types import GenerateRequest, RequestRejected
from tandem.router.migration import MigrationConfig
from tandem.router.routing import Router, RoutingConfig
from tandem.router.worker_registry import WorkerRegistry
from tandem.worker.clients import CallDeadlines

MODEL = describe_model("random:tiny")
TOKENIZER = load_tokenizer(None)
PROMPT = list(range(100, 140))  # 40 tokens


def next_token(tokens: list[int]) -> int:
    """The fake model: greedy, so a continuation must reproduce it exactly."""
    return (sum(tokens) * 31 + len(tokens)) % 200 + 300


def reference(num_tokens: int) -> list[int]:
    tokens = list(PROMPT)
    for _ in range(num_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(PROMPT):]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeCall:
    """A grpc.aio call: awaitable (unary) or readable (stream), cancellable."""

    def __init__(self, produce):
        self._task = asyncio.ensure_future(produce())
        self.messages: asyncio.Queue = asyncio.Queue()

    def __await__(self):
        return self._task.__await__()

    async def read(self):
        item = await self.messages.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        self._task.cancel()
        self.messages.put_nowait(asyncio.CancelledError())
        return True


class FakeWorker:
    """One fake worker; `fail_after` tokens into a Generate it fails as `failure` says."""

    def __init__(self, fail_after: int | None = None, failure: str = "unavailable"):
        self.fail_after = fail_after
        self.failure = failure
        self.generate_requests: list[wpb.WorkerGenerateRequest] = []
        self.prefill_requests: list[wpb.PrefillRequest] = []
        self.released: list[str] = []
        self.prefill_error: grpc.StatusCode | None = None
        self.prefill_gate: asyncio.Event | None = None
        self.pause_after: int | None = None     # tokens into a Generate, wait for `resume`
        self.resume: asyncio.Event | None = None

    def Prefill(self, request, timeout=None):
        self.prefill_requests.append(request)

        async def answer():
            if self.prefill_error is not None:
                raise rpc_error(self.prefill_error, "Socket closed")
            if self.prefill_gate is not None:
                await self.prefill_gate.wait()
            return wpb.PrefillResponse(first_token_id=next_token(list(request.prompt_token_ids)),
                                       kv=wpb.KVHandle(worker_id="p", block_ids=[1, 2, 3]))
        return FakeCall(answer)

    def Generate(self, request, timeout=None):
        self.generate_requests.append(request)
        call = FakeCall(lambda: asyncio.sleep(0))
        asyncio.ensure_future(self._stream(request, call))
        return call

    async def _stream(self, request, call: FakeCall) -> None:
        params = sampling_from_proto(request.sampling)
        tokens = list(request.prompt_token_ids)
        if request.HasField("remote"):
            tokens.append(request.remote.first_token_id)
        num_out = len(tokens) - len(request.prompt_token_ids)
        while num_out < params.max_tokens:
            if self.fail_after is not None and num_out >= self.fail_after:
                if self.failure == "unavailable":
                    call.messages.put_nowait(rpc_error(grpc.StatusCode.UNAVAILABLE,
                                                       "Socket closed"))
                return  # "hang": nothing more ever comes
            if num_out == self.pause_after:
                await self.resume.wait()  # a slow worker: late, then on again
            tokens.append(next_token(tokens))
            num_out += 1
            finish = "length" if num_out == params.max_tokens else ""
            call.messages.put_nowait(wpb.TokenChunk(token_ids=[tokens[-1]],
                                                    finish_reason=finish))
            await asyncio.sleep(0)

    def Release(self, request, timeout=None):
        self.released.append(request.request_id)
        return FakeCall(lambda: asyncio.sleep(0, wpb.ReleaseResponse(released=True)))

    def ExpectPull(self, request, timeout=None):
        return FakeCall(lambda: asyncio.sleep(0, wpb.ExpectPullResponse()))


def make_pipeline(workers: dict[str, FakeWorker], min_remote_tokens: int = 10_000,
                  deadlines: CallDeadlines = CallDeadlines()) -> Pipeline:
    registry = WorkerRegistry(MODEL.name, 16)
    for worker_id in workers:
        role = worker_id.split("-")[0]
        registry.register(Registration(worker_id, role, f"addr-{worker_id}", 16, MODEL.name, 64),
                          0.0)
    router = Router(RoutingConfig(remote_prefill_min_tokens=min_remote_tokens), 16)
    pipeline = Pipeline(MODEL, TOKENIZER, registry, router, FrontendMetrics(registry),
                        deadlines, MigrationConfig(max_migrations=2))
    pipeline.clients.stub = lambda address: workers[address.removeprefix("addr-")]
    pipeline.ready = True
    return pipeline


async def collect(pipeline: Pipeline, max_tokens: int,
                  request_id: str = "req-1") -> tuple[list[int], str | None]:
    request = GenerateRequest(request_id, PROMPT, SamplingParams(max_tokens=max_tokens,
                                                                 temperature=0.0, ignore_eos=True))
    tokens, finish = [], None
    async for chunk in pipeline.generate(request):
        tokens += chunk.token_ids
        finish = chunk.finish_reason or finish
    return tokens, finish


def test_a_decode_worker_dying_mid_stream_continues_exactly_on_another():
    workers = {"decode-0": FakeWorker(fail_after=5), "decode-1": FakeWorker()}
    pipeline = make_pipeline(workers)

    tokens, finish = asyncio.run(collect(pipeline, 12))

    assert tokens == reference(12) and finish == "length"
    retry = workers["decode-1"].generate_requests[0]
    assert retry.request_id == "req-1~m1"
    assert list(retry.prompt_token_ids) == PROMPT + reference(5)
    assert retry.sampling.max_tokens == 7
    assert "decode-0" not in pipeline.workers.workers  # a failed call is evidence of death
    assert pipeline.router.num_active_requests == 0 and pipeline.idle.is_set()
    assert pipeline.metrics.migrations.labels("decode")._value.get() == 1


def test_the_last_decode_worker_dying_is_a_clear_503():
    pipeline = make_pipeline({"decode-0": FakeWorker(fail_after=3)})

    with pytest.raises(RequestRejected) as err:
        asyncio.run(collect(pipeline, 12))

    assert err.value.status == 503
    assert err.value.message == ("no decode worker is left to serve the request: decode worker "
                                 "decode-0 failed (UNAVAILABLE: Socket closed)")
    assert pipeline.router.num_active_requests == 0


def test_a_stalled_decode_worker_hits_its_idle_deadline_and_the_request_moves():
    workers = {"decode-0": FakeWorker(fail_after=4, failure="hang"), "decode-1": FakeWorker()}
    pipeline = make_pipeline(workers, deadlines=CallDeadlines(token_idle_s=0.05))

    tokens, finish = asyncio.run(collect(pipeline, 9))

    assert tokens == reference(9) and finish == "length"
    assert "decode-0" in pipeline.workers.workers  # slow is not dead: its heartbeats decide
    assert workers["decode-1"].generate_requests[0].sampling.max_tokens == 5


def test_a_worker_dropped_from_the_registry_ends_its_calls_at_once():
    workers = {"decode-0": FakeWorker(fail_after=2, failure="hang"), "decode-1": FakeWorker()}
    pipeline = make_pipeline(workers)

    async def run():
        task = asyncio.ensure_future(collect(pipeline, 6))
        while not workers["decode-0"].generate_requests:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        pipeline.workers.deregister("decode-0")  # its heartbeats stopped
        return await asyncio.wait_for(task, 5)

    tokens, finish = asyncio.run(run())
    assert tokens == reference(6) and finish == "length"
    assert pipeline.metrics.migrations.labels("decode")._value.get() == 1


def test_a_late_decode_worker_keeps_its_stream_while_new_requests_go_elsewhere():
    workers = {"decode-0": FakeWorker(), "decode-1": FakeWorker()}
    workers["decode-0"].pause_after = 3
    pipeline = make_pipeline(workers)
    registry = pipeline.workers

    async def run():
        workers["decode-0"].resume = asyncio.Event()
        first = asyncio.ensure_future(collect(pipeline, 8))
        while not workers["decode-0"].generate_requests:
            await asyncio.sleep(0.001)
        registry.heartbeat("decode-1", registry.workers["decode-1"].stats, 9.0)
        assert registry.sweep(10.0) == []  # decode-0 silent 10 s: late, not dead
        second = await asyncio.wait_for(collect(pipeline, 4, "req-2"), 5)
        assert not first.done()            # decode-0's stream still waits, nobody ended it
        registry.heartbeat("decode-0", registry.workers["decode-0"].stats, 10.5)
        workers["decode-0"].resume.set()
        return await asyncio.wait_for(first, 5), second

    (tokens, finish), (second_tokens, _) = asyncio.run(run())
    assert tokens == reference(8) and finish == "length"
    assert second_tokens == reference(4)
    assert [r.request_id for r in workers["decode-1"].generate_requests] == ["req-2"]
    assert [r.request_id for r in workers["decode-0"].generate_requests] == ["req-1"]
    assert pipeline.metrics.migrations.labels("decode")._value.get() == 0
    assert [w.worker_id for w in registry.pool("decode")] == ["decode-0", "decode-1"]


def test_a_dead_prefill_worker_makes_the_decode_worker_prefill():
    workers = {"decode-0": FakeWorker(), "prefill-0": FakeWorker()}
    workers["prefill-0"].prefill_error = grpc.StatusCode.UNAVAILABLE
    pipeline = make_pipeline(workers, min_remote_tokens=1)

    tokens, finish = asyncio.run(collect(pipeline, 4))

    assert tokens == reference(4) and finish == "length"
    assert len(workers["prefill-0"].prefill_requests) == 1
    local = workers["decode-0"].generate_requests[0]
    assert not local.HasField("remote") and list(local.prompt_token_ids) == PROMPT
    assert "prefill-0" not in pipeline.workers.workers
    assert pipeline.metrics.migrations.labels("prefill")._value.get() == 1


def test_remote_prefill_then_decode_death_prefills_again_with_the_first_token():
    workers = {"decode-0": FakeWorker(fail_after=3), "decode-1": FakeWorker(),
               "prefill-0": FakeWorker()}
    pipeline = make_pipeline(workers, min_remote_tokens=1)

    tokens, finish = asyncio.run(collect(pipeline, 8))

    assert tokens == reference(8) and finish == "length"
    prefills = workers["prefill-0"].prefill_requests
    assert [p.request_id for p in prefills] == ["req-1", "req-1~m1"]
    assert list(prefills[1].prompt_token_ids) == PROMPT + reference(3)
    assert workers["prefill-0"].released == []  # decode workers took the blocks both times


def test_a_client_leaving_between_prefill_and_decode_releases_the_pinned_blocks():
    workers = {"decode-0": FakeWorker(), "prefill-0": FakeWorker()}
    pipeline = make_pipeline(workers, min_remote_tokens=1)
    request = GenerateRequest("req-1", PROMPT, SamplingParams(max_tokens=8, temperature=0.0))

    async def run():
        chunks = pipeline.generate(request)
        first = await chunks.__anext__()
        await chunks.aclose()  # the client went away
        for _ in range(5):
            await asyncio.sleep(0)  # the best-effort Release runs
        return first

    first = asyncio.run(run())
    assert first.token_ids == reference(1)
    assert workers["prefill-0"].released == ["req-1"]
    assert workers["decode-0"].generate_requests == []
    assert pipeline.router.num_active_requests == 0


def test_a_prefill_cancelled_mid_call_releases_what_it_may_have_pinned():
    workers = {"decode-0": FakeWorker(), "prefill-0": FakeWorker()}
    workers["prefill-0"].prefill_gate = asyncio.Event()  # never set: the prefill hangs
    pipeline = make_pipeline(workers, min_remote_tokens=1)

    async def run():
        task = asyncio.ensure_future(collect(pipeline, 8))
        while not workers["prefill-0"].prefill_requests:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(run())
    assert workers["prefill-0"].released == ["req-1"]
    assert "prefill-0" in pipeline.workers.workers  # a cancelled client is no worker's fault
    assert pipeline.router.num_active_requests == 0
