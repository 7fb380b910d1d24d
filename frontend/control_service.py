"""The frontend's Control service: workers register, heartbeat and deregister here."""

from __future__ import annotations

import logging
import time
from typing import Protocol

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.contracts.wire import registration_from_proto, worker_stats_from_proto
from tandem.router.worker_registry import WorkerRegistry, WorkerState

logger = logging.getLogger(__name__)


class WorkerListener(Protocol):
    def on_registered(self, worker: WorkerState) -> None: ...

    def on_heartbeat(self, worker: WorkerState) -> None: ...

    def on_removed(self, worker_ids: list[str]) -> None: ...


class ControlService(wgrpc.ControlServicer):
    def __init__(self, workers: WorkerRegistry, heartbeat_interval_s: float,
                 listener: WorkerListener):
        self.workers = workers
        self.heartbeat_interval_s = heartbeat_interval_s
        self.listener = listener

    async def Register(self, request, context):
        try:
            worker = self.workers.register(registration_from_proto(request), time.monotonic())
        except ValueError as err:
            logger.error("refusing worker: %s", err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        self.listener.on_registered(worker)
        return wpb.RegisterResponse(heartbeat_interval_ms=int(self.heartbeat_interval_s * 1000))

    async def Heartbeat(self, request, context):
        known = self.workers.heartbeat(request.worker_id, worker_stats_from_proto(request.stats),
                                       time.monotonic())
        if known:
            self.listener.on_heartbeat(self.workers.workers[request.worker_id])
        return wpb.HeartbeatResponse(known=known)

    async def Deregister(self, request, context):
        self.listener.on_removed([request.worker_id])
        return wpb.DeregisterResponse()
