"""Keeps the router's KV indexes in step with the workers' prefix caches.

For each registered worker the frontend holds one StreamKVEvents call open and applies its events
to the index of the worker's pool. Before the first event, and whenever an event id skips (a lost
event, a restarted worker), it loads a snapshot of the worker's cached hashes and carries on from the
snapshot's event id; events the snapshot already covers are skipped. A worker that deregisters or
dies is dropped from its index. The event stream has no deadline (it is idle while the cache does
not change); the snapshot call has one.

The event stream is also the frontend's standing connection to each worker: when it breaks
(UNAVAILABLE: the worker's process exited and its socket closed, or keepalive pings went
unanswered, worker/keepalive.py), the follower reports the worker as gone (`on_gone`), which drops
it at once, whoever started it and however quiet it was.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.router.kv_index import KVIndex
from tandem.router.migration import WORKER_GONE_CODES
from tandem.router.worker_registry import WorkerState
from tandem.contracts.wire import kv_event_from_proto
from tandem.worker.clients import CallDeadlines

logger = logging.getLogger(__name__)


class KVEventFollower:
    def __init__(self, indexes: dict[str, KVIndex],
                 stub_for: Callable[[WorkerState], wgrpc.WorkerStub],
                 snapshot_timeout_s: float = CallDeadlines().snapshot_s,
                 on_gone: Callable[[WorkerState, str], None] | None = None):
        self.indexes = indexes  # role -> index
        self.snapshot_timeout_s = snapshot_timeout_s
        self.stub_for = stub_for
        self.on_gone = on_gone  # (worker, reason) when its connection broke
        self.tasks: dict[str, asyncio.Task] = {}
        self.roles: dict[str, str] = {}

    def follow(self, worker: WorkerState) -> None:
        """Start (or restart, for a worker that registered again) following a worker."""
        self.forget(worker.worker_id)
        self.roles[worker.worker_id] = worker.role
        self.indexes[worker.role].add_worker(worker.worker_id)
        self.tasks[worker.worker_id] = asyncio.create_task(self._run(worker),
                                                           name=f"kv-events-{worker.worker_id}")

    def forget(self, worker_id: str) -> None:
        task = self.tasks.pop(worker_id, None)
        if task is not None:
            task.cancel()
        role = self.roles.pop(worker_id, None)
        if role is not None:
            self.indexes[role].remove_worker(worker_id)

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for worker_id in list(self.tasks):
            self.forget(worker_id)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, worker: WorkerState) -> None:
        stub = self.stub_for(worker)
        index = self.indexes[worker.role]
        call = stub.StreamKVEvents(wpb.KVEventsRequest())
        try:
            last = await self._snapshot(stub, worker, index)
            async for batch in call:
                for message in batch.events:
                    if message.event_id <= last:
                        continue  # already in the snapshot
                    if index.apply(worker.worker_id, kv_event_from_proto(message)):
                        last = message.event_id
                    else:
                        logger.info("worker %s: KV event %d after %d; reloading its snapshot",
                                    worker.worker_id, message.event_id, last)
                        last = await self._snapshot(stub, worker, index)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                logger.warning("worker %s: KV event stream ended (%s)", worker.worker_id,
                               err.code().name)
            if err.code().name in WORKER_GONE_CODES and self.on_gone is not None:
                self.on_gone(worker, f"its connection broke ({err.details() or 'UNAVAILABLE'})")
        finally:
            call.cancel()

    async def _snapshot(self, stub: wgrpc.WorkerStub, worker: WorkerState,
                        index: KVIndex) -> int:
        snapshot = await stub.GetKVSnapshot(wpb.KVSnapshotRequest(),
                                             timeout=self.snapshot_timeout_s)
        parents = [parent if has else None
                   for parent, has in zip(snapshot.parent_hashes, snapshot.has_parent)]
        index.load_snapshot(worker.worker_id, snapshot.last_event_id, snapshot.block_hashes,
                            parents)
        return snapshot.last_event_id
