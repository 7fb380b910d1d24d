"""Calls to workers' gRPC API, shared by the frontend and decode workers: one channel per worker
address, kept for the life of the caller, the deadline of every kind of call, and the best-effort
calls nobody waits for (Release of pinned prefill blocks, ExpectPull).

Every call between workers has a deadline, so that a worker that stopped answering (a stopped
process, a hung engine) costs its callers a bounded wait. Streams get an idle deadline per message
instead of one for the whole stream: a long generation is not a slow one. The KV event stream is
the one call without a deadline (it is idle whenever the cache does not change); it ends when its
worker drops out of the registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, fields

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.worker.auth import InternalChannel, internal_channel

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CallDeadlines:
    """Seconds each kind of worker call may take. The long ones are backstops: a worker whose
    process exits, whose connection stops answering keepalive pings (worker/auth.py) or whose
    heartbeats stop for the registry's `dead_after_s` is dropped, which ends its calls sooner."""
    prefill_s: float = 60.0              # Prefill: queueing behind at most max_prefill_queue others
    # Generate, to its first message: a pull (30 s transfer timeout by default), then maybe a
    # recompute of the prompt.
    first_token_s: float = 120.0
    token_idle_s: float = 60.0           # Generate, between two messages (preemption, recompute)
    release_s: float = 5.0
    expect_pull_s: float = 5.0
    transfer_info_s: float = 10.0
    snapshot_s: float = 30.0             # GetKVSnapshot: a cache of millions of blocks

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"deadline {f.name} must be positive, got {getattr(self, f.name)}")


class WorkerClients:
    def __init__(self, deadlines: CallDeadlines = CallDeadlines()):
        self.deadlines = deadlines
        self.channels: dict[str, InternalChannel] = {}
        # One stub per channel: a stub makes a multi-callable for each of the service's methods.
        self._stubs: dict[str, wgrpc.WorkerStub] = {}
        self._unawaited: set[asyncio.Task] = set()  # referenced until done, as asyncio requires

    def stub(self, address: str) -> wgrpc.WorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = self.channels[address] = internal_channel(address)
            stub = self._stubs[address] = wgrpc.WorkerStub(channel)
        return stub

    def send_soon(self, call: Coroutine) -> None:
        """Run a best-effort call (one of the methods below) without waiting for it."""
        task = asyncio.ensure_future(call)
        self._unawaited.add(task)
        task.add_done_callback(self._unawaited.discard)

    async def release(self, address: str, request_id: str) -> None:
        """Ask a prefill worker to free a request's pinned blocks; its lease frees them if this
        fails."""
        try:
            await self.stub(address).Release(wpb.ReleaseRequest(request_id=request_id),
                                                timeout=self.deadlines.release_s)
        except grpc.aio.AioRpcError as err:
            logger.info("request %s: release on %s failed (%s); its lease will free the blocks",
                        request_id, address, err.code().name)

    async def expect_pull(self, address: str, request: wpb.ExpectPullRequest) -> None:
        """Tell a decode worker that a pull from a prefill worker will follow; it only warms."""
        try:
            await self.stub(address).ExpectPull(request, timeout=self.deadlines.expect_pull_s)
        except grpc.aio.AioRpcError as err:
            logger.debug("request %s: ExpectPull on %s failed (%s)", request.request_id, address,
                         err.code().name)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()
        self._stubs.clear()
