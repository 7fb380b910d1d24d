"""One Worker gRPC service whose role can change while the process runs: the role flip.

The planner moves GPUs between the prefill and decode pools. A new worker loads its weights in
minutes; a flip keeps them, and the KV memory, and takes seconds. The gRPC server holds this one
object for the life of the process, and it hands each call to the service of the current role
(prefill_workers.service.PrefillWorker or decode_workers.service.DecodeWorker), both built around
the process's one engine, one engine loop and one NIXL agent.

`SetRole` drains, then switches: the old role's background task stops, the engine rebuilds its
scheduler over the same block manager (LLMEngine.set_role, so the prefix cache stays valid), the new
role's service takes over the old one's engine loop, counters and KV event subscribers (WorkerBase's
`previous`), its background task starts, and the worker registers with the frontend again in its
new role, which moves it from one pool of the frontend's registry and router to the other.

Draining. The frontend stops routing to the worker before it calls SetRole (or Drain, before a
scale-down); calls already on their way are still served and counted. The worker is drained when
no Prefill or Generate call is open, the engine holds no unfinished request, and no prefilled
blocks stay pinned (the old role keeps releasing them on pull notifications and expired leases
while it drains). Calls that arrive during the switch itself wait for it; one for a role the worker
no longer has fails with FAILED_PRECONDITION, and the frontend moves that request elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.engine.llm_engine import LLMEngine
from tandem.worker.base import WorkerBase, register_once
from tandem.worker.config import WORKER_ROLES, WorkerOptions

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.01   # drained state is read between engine steps; 10 ms is short next to a flip


def role_service(role: str, options: WorkerOptions, engine: LLMEngine, agent,
                 previous: WorkerBase | None = None) -> WorkerBase:
    if role == "prefill":
        from tandem.prefill_workers.service import PrefillWorker
        return PrefillWorker(options, engine, agent, previous=previous)
    from tandem.decode_workers.service import DecodeWorker
    return DecodeWorker(options, engine, agent, previous=previous)


class RoleSwitchingWorker(wgrpc.WorkerServicer):
    def __init__(self, options: WorkerOptions, engine: LLMEngine, agent):
        self.options = options
        self.engine = engine
        self.agent = agent
        self.address = ""                  # host:port, set once the gRPC server is bound
        self.current = role_service(options.role, options, engine, agent)
        self.is_draining = False
        self._num_calls = 0                # Prefill and Generate calls open now
        self._open = asyncio.Event()       # cleared while a switch runs: calls wait
        self._open.set()
        self._switch_lock = asyncio.Lock()
        self._role_ready = asyncio.Event()  # the current role's background may (re)start
        self._role_ready.set()
        self._role_task: asyncio.Task | None = None

    # ---- what serve_worker and the heartbeats use --------------------------------------------

    @property
    def async_engine(self):
        return self.current.async_engine

    def start(self) -> None:
        self.current.start()

    async def stats(self):
        return await self.current.stats()

    async def close(self) -> None:
        await self.current.close()

    async def background(self) -> None:
        """The current role's background work, restarted in the new role after each flip."""
        try:
            while True:
                await self._role_ready.wait()
                self._role_task = asyncio.create_task(self.current.background())
                await asyncio.wait([self._role_task])
                if not self._role_task.cancelled() and self._role_task.exception() is not None:
                    raise self._role_task.exception()
        finally:
            if self._role_task is not None:
                self._role_task.cancel()

    # ---- role-specific calls ----------------------------------------------------------------

    async def Prefill(self, request, context):
        async with self._call("prefill", context):
            return await self.current.Prefill(request, context)

    async def Generate(self, request, context):
        async with self._call("decode", context):
            async for chunk in self.current.Generate(request, context):
                yield chunk

    async def ExpectPull(self, request, context):
        if self.options.role != "decode":
            return wpb.ExpectPullResponse()  # a hint only: nothing to warm for a prefill worker
        return await self.current.ExpectPull(request, context)

    async def Release(self, request, context):
        if self.options.role != "prefill":
            return wpb.ReleaseResponse(released=False)  # pins were all gone before the flip
        return await self.current.Release(request, context)

    # ---- calls of every role ----------------------------------------------------------------

    async def GetTransferInfo(self, request, context):
        return await self.current.GetTransferInfo(request, context)

    async def GetStats(self, request, context):
        return await self.current.GetStats(request, context)

    async def GetKVSnapshot(self, request, context):
        return await self.current.GetKVSnapshot(request, context)

    async def StreamKVEvents(self, request, context):
        async for batch in self.current.StreamKVEvents(request, context):
            yield batch

    # ---- drain and flip ---------------------------------------------------------------------

    async def SetRole(self, request: wpb.SetRoleRequest, context) -> wpb.SetRoleResponse:
        role = request.role
        if role not in WORKER_ROLES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"role must be one of {list(WORKER_ROLES)}, got {role!r}")
        async with self._switch_lock:
            previous = self.options.role
            if role == previous:
                return wpb.SetRoleResponse(previous_role=previous, role=role, pid=os.getpid())
            drained, drain_s = await self._drain(request.drain_timeout_s, keep_closed=True)
            if not drained:
                self._reopen()
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"worker {self.options.worker_id} still busy after "
                                    f"{drain_s:.1f} s of draining; it stays {previous}")
            started = time.monotonic()
            try:
                await self._switch(role)
            finally:
                self._reopen()
            await register_once(self, self.address)
            switch_s = time.monotonic() - started
        logger.info("worker %s flipped from %s to %s: drained in %.2f s, switched in %.3f s",
                    self.options.worker_id, previous, role, drain_s, switch_s)
        return wpb.SetRoleResponse(previous_role=previous, role=role, drain_seconds=drain_s,
                                   switch_seconds=switch_s, pid=os.getpid())

    async def Drain(self, request: wpb.DrainRequest, context) -> wpb.DrainResponse:
        drained, drain_s = await self._drain(request.timeout_s, keep_closed=False)
        left = 0 if drained else await self._num_unfinished()
        logger.info("worker %s %s after %.2f s of draining", self.options.worker_id,
                    "drained" if drained else f"still has {left} in flight", drain_s)
        return wpb.DrainResponse(drained=drained, drain_seconds=drain_s, num_unfinished=left)

    async def _drain(self, timeout_s: float, keep_closed: bool) -> tuple[bool, float]:
        """Wait until nothing is in flight; with keep_closed, return with new calls held back."""
        self.is_draining = True
        started = time.monotonic()
        while True:
            if await self._num_unfinished() == 0:
                self._open.clear()
                # A call admitted since the count above would be missed: count once more, closed.
                if await self._num_unfinished() == 0:
                    if not keep_closed:
                        self._open.set()
                    return True, time.monotonic() - started
                self._open.set()
            if timeout_s > 0 and time.monotonic() - started > timeout_s:
                return False, time.monotonic() - started
            await asyncio.sleep(DRAIN_POLL_S)

    def _reopen(self) -> None:
        self.is_draining = False
        self._open.set()

    async def _num_unfinished(self) -> int:
        stats = await self.async_engine.call(self.engine.stats)
        return (self._num_calls + stats.num_running + stats.num_waiting
                + stats.num_pinned_requests)

    async def _switch(self, role: str) -> None:
        old = self.current
        self._role_ready.clear()
        if self._role_task is not None:
            self._role_task.cancel()
            await asyncio.gather(self._role_task, return_exceptions=True)
        await old.close()
        await self.async_engine.call(lambda: self.engine.set_role(role))
        self.options.role = role
        self.options.engine = self.engine.config
        self.current = role_service(role, self.options, self.engine, self.agent, previous=old)
        self._role_ready.set()

    @contextlib.asynccontextmanager
    async def _call(self, role: str, context):
        await self._open.wait()
        if self.options.role != role:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"worker {self.options.worker_id} serves {self.options.role} now, "
                                f"not {role}")
        self._num_calls += 1
        try:
            yield
        finally:
            self._num_calls -= 1
