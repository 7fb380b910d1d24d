"""The prefill worker's service on a real CPU engine, called directly with a fake gRPC context:
the answer's KV handle names pinned blocks, and every way out (Release, a pull notification, the
lease, a cancelled call, a bad request) gives them back."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.contracts.kv_layout import KV_LAYOUT_VERSION
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.prefill_workers.service import PrefillWorker
from tandem.worker.config import WorkerConfig, WorkerOptions

NUM_BLOCKS = 64
BLOCK = 16


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code


class FakeContext:
    """What the service uses of grpc.aio's servicer context."""

    async def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)


class FakeAgent:
    """Pull notifications as a NIXL agent reports them: (peer, message)."""

    def __init__(self):
        self.notifications: list[tuple[str, bytes]] = []

    def get_notifications(self):
        pending, self.notifications = self.notifications, []
        return pending


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model="random:tiny", role="prefill", device="cpu",
                                  num_kv_blocks=NUM_BLOCKS, max_model_len=512,
                                  block_size=BLOCK))


def make_worker(engine, agent=None, lease_s: float = 30.0) -> PrefillWorker:
    options = WorkerOptions("prefill-0", "prefill", "127.0.0.1:1", engine.config,
                            WorkerConfig(lease_s=lease_s), internal_secret="x" * 32)
    worker = PrefillWorker(options, engine, agent)
    worker.start()
    return worker


def prefill_request(request_id: str, num_tokens: int = 40) -> wpb.PrefillRequest:
    return wpb.PrefillRequest(request_id=request_id,
                              prompt_token_ids=list(range(3, 3 + num_tokens)),
                              sampling=pb.SamplingOptions(temperature=0.0, max_tokens=8))


def run(coro):
    return asyncio.run(coro)


def test_prefill_pins_the_prompt_blocks_until_release(engine):
    async def scenario():
        worker = make_worker(engine)
        try:
            response = await worker.Prefill(prefill_request("r1"), FakeContext())
            assert response.kv.worker_id == "prefill-0"
            assert response.kv.layout_version == KV_LAYOUT_VERSION
            assert len(response.kv.block_ids) == 3  # 40 tokens in 16-token blocks
            assert await worker.async_engine.call(lambda: engine.pinned_blocks("r1")) == \
                list(response.kv.block_ids)
            assert (await worker.stats()).num_pinned_requests == 1
            released = await worker.Release(wpb.ReleaseRequest(request_id="r1"), FakeContext())
            assert released.released
            again = await worker.Release(wpb.ReleaseRequest(request_id="r1"), FakeContext())
            assert not again.released
            assert (await worker.stats()).num_pinned_requests == 0
        finally:
            await worker.async_engine.stop()
    run(scenario())


def test_a_pull_notification_frees_the_blocks(engine):
    async def scenario():
        agent = FakeAgent()
        worker = make_worker(engine, agent)
        background = asyncio.create_task(worker.background())
        try:
            await worker.Prefill(prefill_request("r2"), FakeContext())
            agent.notifications.append(("decode-0", b"r2"))
            for _ in range(200):
                if (await worker.stats()).num_pinned_requests == 0:
                    break
                await asyncio.sleep(0.01)
            assert (await worker.stats()).num_pinned_requests == 0
        finally:
            background.cancel()
            await worker.async_engine.stop()
    run(scenario())


def test_the_lease_frees_blocks_nobody_pulled(engine):
    async def scenario():
        worker = make_worker(engine, FakeAgent(), lease_s=0.2)
        background = asyncio.create_task(worker.background())
        try:
            await worker.Prefill(prefill_request("r3"), FakeContext())
            assert (await worker.stats()).num_pinned_requests == 1
            for _ in range(300):
                if (await worker.stats()).num_pinned_requests == 0:
                    break
                await asyncio.sleep(0.01)
            assert (await worker.stats()).num_pinned_requests == 0
        finally:
            background.cancel()
            await worker.async_engine.stop()
    run(scenario())


def test_a_cancelled_prefill_leaves_nothing_pinned(engine):
    async def scenario():
        worker = make_worker(engine)
        try:
            call = asyncio.create_task(worker.Prefill(prefill_request("r4", 300), FakeContext()))
            await asyncio.sleep(0)  # the call is under way, perhaps mid-step
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            for _ in range(200):
                stats = await worker.stats()
                if stats.num_pinned_requests == 0 and stats.num_running == 0:
                    break
                await asyncio.sleep(0.01)
            assert stats.num_pinned_requests == 0 and stats.num_running == 0
        finally:
            await worker.async_engine.stop()
    run(scenario())


def test_a_bad_request_is_invalid_argument_and_pins_nothing(engine):
    async def scenario():
        worker = make_worker(engine)
        try:
            bad = prefill_request("r5", 600)  # longer than max_model_len
            with pytest.raises(Aborted) as err:
                await worker.Prefill(bad, FakeContext())
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "512" in str(err.value)
            assert (await worker.stats()).num_pinned_requests == 0
        finally:
            await worker.async_engine.stop()
    run(scenario())
