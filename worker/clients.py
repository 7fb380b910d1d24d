"""Calls to workers' gRPC API, shared by the frontend and decode workers: one channel per worker
address, kept for the life of the caller, and the best-effort calls nobody waits for (Release of
pinned prefill blocks, ExpectPull)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.worker.auth import internal_channel

logger = logging.getLogger(__name__)


class WorkerClients:
    def __init__(self):
        self.channels: dict[str, grpc.aio.Channel] = {}
        self._unawaited: set[asyncio.Task] = set()  # referenced until done, as asyncio requires

    def stub(self, address: str) -> wgrpc.WorkerStub:
        channel = self.channels.get(address)
        if channel is None:
            channel = self.channels[address] = internal_channel(address)
        return wgrpc.WorkerStub(channel)

    def send_soon(self, call: Coroutine) -> None:
        """Run a best-effort call (one of the methods below) without waiting for it."""
        task = asyncio.ensure_future(call)
        self._unawaited.add(task)
        task.add_done_callback(self._unawaited.discard)

    async def release(self, address: str, request_id: str) -> None:
        """Ask a prefill worker to free a request's pinned blocks; its lease frees them if this
        fails."""
        try:
            await self.stub(address).Release(wpb.ReleaseRequest(request_id=request_id), timeout=5)
        except grpc.aio.AioRpcError as err:
            logger.info("request %s: release on %s failed (%s); its lease will free the blocks",
                        request_id, address, err.code().name)

    async def expect_pull(self, address: str, request: wpb.ExpectPullRequest) -> None:
        """Tell a decode worker that a pull from a prefill worker will follow; it only warms."""
        try:
            await self.stub(address).ExpectPull(request, timeout=5)
        except grpc.aio.AioRpcError as err:
            logger.debug("request %s: ExpectPull on %s failed (%s)", request.request_id, address,
                         err.code().name)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()
