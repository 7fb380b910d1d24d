"""The frontend's Control service: workers register, heartbeat and deregister here."""

from __future__ import annotations

import logging
import time

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.router.worker_registry import WorkerRegistry

logger = logging.getLogger(__name__)


class ControlService(wgrpc.ControlServicer):
    def __init__(self, workers: WorkerRegistry, heartbeat_interval_s: float):
        self.workers = workers
        self.heartbeat_interval_s = heartbeat_interval_s

    async def Register(self, request, context):
        try:
            self.workers.register(request, time.monotonic())
        except ValueError as err:
            logger.error("refusing worker: %s", err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return wpb.RegisterResponse(heartbeat_interval_ms=int(self.heartbeat_interval_s * 1000))

    async def Heartbeat(self, request, context):
        known = self.workers.heartbeat(request.worker_id, request.stats, time.monotonic())
        return wpb.HeartbeatResponse(known=known)

    async def Deregister(self, request, context):
        self.workers.deregister(request.worker_id)
        return wpb.DeregisterResponse()
