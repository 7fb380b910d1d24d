"""The KV event follower against fake worker stubs: events reach the worker's index, and a stream
that breaks (UNAVAILABLE) reports the worker gone, while one the frontend cancelled does not."""

from __future__ import annotations

import asyncio

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.frontend.kv_follower import KVEventFollower
from tandem.router.kv_index import KVIndex
from tandem.router.worker_registry import WorkerState


class FakeStream:
    """A StreamKVEvents call: yields `batches`, then ends with `error` (or waits forever)."""

    def __init__(self, batches: list[wpb.KVEventBatch], error: grpc.StatusCode | None):
        self.batches, self.error = batches, error
        self.is_cancelled = False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for batch in self.batches:
            yield batch
        if self.error is None:
            await asyncio.Event().wait()
        raise grpc.aio.AioRpcError(self.error, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   "Socket closed")

    def cancel(self) -> bool:
        self.is_cancelled = True
        return True


class FakeStub:
    def __init__(self, stream: FakeStream):
        self.stream = stream

    def StreamKVEvents(self, request):
        return self.stream

    async def GetKVSnapshot(self, request, timeout=None):
        return wpb.KVSnapshot(last_event_id=0, block_size=16)


def stored(event_id: int, block_hash: int, parent: int | None = None) -> wpb.KVEventBatch:
    return wpb.KVEventBatch(events=[wpb.KVEvent(event_id=event_id, stored=wpb.BlocksStored(
        block_hashes=[block_hash], parent_hash=parent or 0, has_parent=parent is not None))])


def follow(stream: FakeStream) -> tuple[KVEventFollower, list[tuple[str, str]], dict]:
    gone: list[tuple[str, str]] = []
    indexes = {"decode": KVIndex(), "prefill": KVIndex()}
    follower = KVEventFollower(indexes, lambda worker: FakeStub(stream),
                               on_gone=lambda worker, reason: gone.append((worker.worker_id,
                                                                           reason)))
    return follower, gone, indexes


def test_a_broken_event_stream_reports_its_worker_gone_after_applying_its_events():
    stream = FakeStream([stored(1, 11), stored(2, 22, parent=11)],
                        grpc.StatusCode.UNAVAILABLE)
    follower, gone, indexes = follow(stream)

    async def run():
        follower.follow(WorkerState("decode-0", "decode", "a:1", 16, 64, 0.0))
        await asyncio.wait_for(follower.tasks["decode-0"], 5)

    asyncio.run(run())
    assert gone == [("decode-0", "its connection broke (Socket closed)")]
    assert dict(indexes["decode"].overlaps([11, 22])) == {"decode-0": 2}
    assert stream.is_cancelled


def test_a_stream_the_frontend_cancels_reports_nothing():
    follower, gone, indexes = follow(FakeStream([stored(1, 11)], None))

    async def run():
        follower.follow(WorkerState("decode-0", "decode", "a:1", 16, 64, 0.0))
        await asyncio.sleep(0.05)
        await follower.close()

    asyncio.run(run())
    assert gone == [] and follower.tasks == {}
    assert dict(indexes["decode"].overlaps([11])) == {}  # forgotten with its worker
