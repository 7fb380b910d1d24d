"""What every worker process shares, whatever its role: the engine behind an asyncio loop, the NIXL
agent over its KV cache, the Worker gRPC methods that do not depend on the role, and registration
with the frontend followed by heartbeats carrying the worker's load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.worker.auth import internal_channel
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.step_log import StepLog
from tandem.worker.config import WorkerOptions
from tandem.contracts.wire import kv_event_to_proto, registration_to_proto, worker_stats_to_proto
from tandem.contracts.worker_stats import Registration, WorkerStats

logger = logging.getLogger(__name__)

# A heartbeat slower than this is retried; it was 1 s, which a frontend serving 256 streams on a
# starved 2-core host missed, so heartbeats that were merely late counted as lost.
HEARTBEAT_TIMEOUT_S = 5.0


@dataclass(slots=True)
class TransferCounters:
    bytes_total: int = 0
    seconds_total: float = 0.0
    warm_reads: int = 0


class WorkerBase(wgrpc.WorkerServicer):
    """Worker methods common to both roles; subclasses add Prefill or Generate."""

    def __init__(self, options: WorkerOptions, engine: LLMEngine, agent,
                 previous: WorkerBase | None = None):
        """`previous`: the same process's service in its old role, after a role flip; the new one
        takes over its engine loop, transfer counters and KV event subscribers instead of starting
        its own (one engine has one step loop and one event feed)."""
        self.options = options
        self.engine = engine
        self.agent = agent  # NixlKVAgent, or None when transfers are off
        if previous is not None:
            self.async_engine = previous.async_engine
            self.transfers = previous.transfers
            self.kv_subscribers = previous.kv_subscribers
            self.loop = previous.loop
            return
        self.async_engine = AsyncEngine(engine, StepLog.from_env(options.worker_id))
        self.transfers = TransferCounters()
        self.kv_subscribers: list[asyncio.Queue] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        engine.subscribe_kv_events(self._on_kv_event)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.async_engine.start()

    def _on_kv_event(self, event) -> None:
        """Called by the block manager, on the engine's step thread or on the loop."""
        if self.loop is None:
            return
        for queue in list(self.kv_subscribers):
            self.loop.call_soon_threadsafe(queue.put_nowait, event)

    async def StreamKVEvents(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        self.kv_subscribers.append(queue)
        try:
            while True:
                events = [await queue.get()]
                while not queue.empty() and len(events) < 1024:  # batch what has piled up
                    events.append(queue.get_nowait())
                yield wpb.KVEventBatch(events=[kv_event_to_proto(e) for e in events])
        finally:
            self.kv_subscribers.remove(queue)

    async def GetKVSnapshot(self, request, context):
        last_event_id, hashes, parents = await self.async_engine.call(self.engine.kv_snapshot)
        return wpb.KVSnapshot(last_event_id=last_event_id, block_hashes=hashes,
                              block_size=self.engine.config.block_size,
                              parent_hashes=[p or 0 for p in parents],
                              has_parent=[p is not None for p in parents])

    async def GetTransferInfo(self, request, context):
        if self.agent is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"worker {self.options.worker_id} has KV transfer disabled")
        return wpb.TransferInfo(agent_name=self.agent.name, agent_metadata=self.agent.metadata(),
                                region=self.agent.region.to_bytes())

    async def GetStats(self, request, context):
        return worker_stats_to_proto(await self.stats())

    async def stats(self) -> WorkerStats:
        s = await self.async_engine.call(self.engine.stats)
        return WorkerStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_blocks=s.num_blocks,
            num_free_blocks=s.num_free_blocks, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, num_pinned_requests=s.num_pinned_requests,
            kv_transfer_bytes=self.transfers.bytes_total,
            kv_transfer_seconds=self.transfers.seconds_total,
            kv_warm_reads=self.transfers.warm_reads, num_preemptions=s.num_preemptions)

    async def close(self) -> None:
        """Stop role-specific tasks before the agent closes."""

    async def background(self) -> None:
        """Role-specific periodic work; runs for the life of the worker."""
        await asyncio.Event().wait()


async def register_and_heartbeat(worker: WorkerBase, address: str) -> None:
    """Register with the frontend, then send heartbeats until cancelled.

    A worker that cannot reach its frontend for `frontend_silence_s` (WorkerConfig) exits: a
    frontend that died must not leave workers behind. A heartbeat may take its time (a busy
    frontend on a starved host answers late); a late one still counts, a lost one does not.
    """
    options = worker.options
    max_silence_s = options.config.frontend_silence_s
    async with internal_channel(options.frontend) as channel:
        control = wgrpc.ControlStub(channel)
        interval_s = await _register(control, registration_of(worker, address), max_silence_s)
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(interval_s)
            try:
                reply = await control.Heartbeat(
                    wpb.HeartbeatRequest(worker_id=options.worker_id,
                                         stats=worker_stats_to_proto(await worker.stats())),
                    timeout=HEARTBEAT_TIMEOUT_S)
                last_ok = time.monotonic()
                if not reply.known:
                    logger.info("frontend forgot worker %s; registering again", options.worker_id)
                    interval_s = await _register(control, registration_of(worker, address),
                                                 max_silence_s)
            except grpc.aio.AioRpcError as err:
                if time.monotonic() - last_ok > max_silence_s:
                    raise SystemExit(f"frontend {options.frontend} unreachable for "
                                     f"{max_silence_s:.0f} s ({err.code().name}); exiting")


def registration_of(worker: WorkerBase, address: str) -> wpb.RegisterRequest:
    """The worker as it is now: after a role flip, its new role."""
    options = worker.options
    return registration_to_proto(Registration(
        worker_id=options.worker_id, role=options.role, address=address,
        block_size=worker.engine.config.block_size, model=worker.engine.config.model,
        num_blocks=worker.engine.num_blocks))


async def register_once(worker: WorkerBase, address: str, max_wait_s: float = 10.0) -> None:
    """Register again now (after a role flip), on a channel of its own."""
    async with internal_channel(worker.options.frontend) as channel:
        await _register(wgrpc.ControlStub(channel), registration_of(worker, address), max_wait_s)


async def _register(control: wgrpc.ControlStub, request: wpb.RegisterRequest,
                    max_wait_s: float) -> float:
    deadline = time.monotonic() + max_wait_s
    while True:
        try:
            reply = await control.Register(request, timeout=5.0)
            logger.info("worker %s registered as %s at %s", request.worker_id, request.role,
                        request.address)
            return reply.heartbeat_interval_ms / 1000.0
        except grpc.aio.AioRpcError as err:
            if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
                raise SystemExit(f"frontend refused worker {request.worker_id}: {err.details()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"worker {request.worker_id} cannot register with its frontend: "
                                 f"{err.code().name}")
            await asyncio.sleep(0.2)
