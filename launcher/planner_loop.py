"""The online planner's adapter: observe the frontend, call the pure policy, act on the deployment.

Every `interval_s` it reads the frontend's counters and registry into an `Observation`
(frontend/planner_metrics.py, planner/interval_stats.py), calls `Planner.on_tick`, logs and exports
the decision (`tandem_planner_*` on the frontend's /metrics), and, in mode `on`, carries out its
actions, each in a task of its own so a long drain does not hold up the next tick:

- AddWorker(role): a new worker id (unique over the deployment's life) and a free device, then
  `Deployment.start_worker`; it is reported not ready until it registers.
- RemoveWorker(id): the frontend stops routing to it, the worker drains (Drain RPC: requests in
  flight finish, pinned prefill blocks are pulled or expire), then `Deployment.stop_worker` and the
  frontend forgets it. No request fails because of a scale-down.
- FlipRole(id, role): the frontend stops routing to it, then SetRole drains it and switches its
  role in the same process (launcher/role_switch.py); the worker registers again in its new role.
  A flip that cannot drain in time is undone: the worker keeps its role and is routed to again.

Roles: workers are prefill or decode; an aggregated worker is a decode worker with no prefill
pool. With the planner's layout `agg` decode workers are its `both` pool; with `disagg` they are
its `decode` pool. Layout `auto` (changing between the two while serving) is not supported here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.engine.config import EngineConfig
from tandem.frontend.planner_metrics import PlannerExporter, read_totals
from tandem.frontend.server import Frontend
from tandem.launcher.deploy import Deployment
from tandem.planner.config import PlannerConfig
from tandem.planner.interval_stats import ServingTotals, observe_interval, worker_view
from tandem.planner.observation import AddWorker, Decision, FlipRole, Observation, RemoveWorker
from tandem.planner.perf_model import PerfModel
from tandem.planner.profile_catalog import default_profile
from tandem.planner.policy import Planner
from tandem.router.routing import RoutingConfig
from tandem.worker.clients import WorkerClients
from tandem.worker.config import WorkerOptions

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0   # after a drain, how long a worker may take to exit before SIGKILL


def planner_role(worker_role: str, layout: str) -> str:
    return "both" if layout == "agg" and worker_role == "decode" else worker_role


def worker_role(role: str) -> str:
    return "decode" if role == "both" else role


class WorkerIds:
    """Worker ids never reused over a deployment's life: `<role>-<n>`, n counting up per role."""

    def __init__(self, used: list[str]):
        self._used = set(used)

    def next(self, role: str) -> str:
        n = 0
        while f"{role}-{n}" in self._used:
            n += 1
        self._used.add(f"{role}-{n}")
        return f"{role}-{n}"


class Devices:
    """Which device each worker holds: one GPU each, or all on the CPU."""

    def __init__(self, all_devices: list[str], held: dict[str, str]):
        self._all = all_devices
        self._held = dict(held)

    def take(self, worker_id: str) -> str | None:
        busy = set(self._held.values())
        # A device without an index (cpu; "cuda" where Ray places each worker) is shared.
        free = next((d for d in self._all if ":" not in d or d not in busy), None)
        if free is not None:
            self._held[worker_id] = free
        return free

    def give_back(self, worker_id: str) -> None:
        self._held.pop(worker_id, None)


@dataclass(frozen=True, slots=True)
class FlipRecord:
    worker_id: str
    from_role: str
    to_role: str
    drain_s: float
    switch_s: float
    total_s: float        # as the adapter saw it: marking, drain, switch, registering again
    pid: int


def serving_planner(config: PlannerConfig, perf_model: PerfModel, engine: EngineConfig,
                    routing: RoutingConfig) -> Planner:
    """The planner, sized as the workers run: at most max_num_seqs sequences each, prompts chunked
    at their step budget, and the router's choice of which prompts reach the prefill pool and
    when they spill to decode workers."""
    return Planner(config, perf_model, max_batch_size=engine.max_num_seqs,
                   chunk_tokens=engine.max_num_batched_tokens,
                   prefill_chunk_tokens=engine.max_num_batched_tokens, routing=routing)


class PlannerLoop:
    def __init__(self, config: PlannerConfig, perf_model: PerfModel, frontend: Frontend,
                 deployment: Deployment, specs: list[WorkerOptions], devices: list[str],
                 drain_timeout_s: float):
        if config.layout == "auto":
            raise ValueError("the serving planner supports layout disagg or agg, not auto")
        self.config = config
        self.planner = serving_planner(config, perf_model, specs[-1].engine,
                                       frontend.router.config)
        self.frontend = frontend
        self.deployment = deployment
        self.template = specs[-1]
        self.ids = WorkerIds([s.worker_id for s in specs])
        self.devices = Devices(devices, {s.worker_id: s.engine.device for s in specs})
        self.drain_timeout_s = drain_timeout_s
        self.exporter = PlannerExporter(frontend.metrics.registry, config.is_advisory)
        self.clients = WorkerClients()
        self.flips: list[FlipRecord] = []
        self._starting: dict[str, str] = {}   # worker id -> worker role, until it registers
        self._busy: set[str] = set()          # being flipped or removed
        self._actions: set[asyncio.Task] = set()
        self._last: ServingTotals | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every interval until `stop` is set; actions in flight are then cancelled."""
        self._last = self._totals()
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self.config.interval_s)
                    break
                except asyncio.TimeoutError:
                    pass
                self.tick()
        finally:
            for task in list(self._actions):
                task.cancel()
            await asyncio.gather(*self._actions, return_exceptions=True)
            await self.clients.close()

    def tick(self) -> Decision:
        obs = self.observe()
        decision = self.planner.on_tick(obs)
        self.exporter.export(obs, decision)
        if decision.actions:
            logger.info("planner %s%s: %s", decision.kind,
                        " (advisory, not applied)" if decision.is_advisory else "",
                        decision.reason)
        if not decision.is_advisory:
            for action in decision.actions:
                self._spawn(self._apply(action, decision.reason))
        return decision

    def observe(self) -> Observation:
        totals = self._totals()
        prev, self._last = self._last or totals, totals
        return observe_interval(prev, totals, self._worker_views())

    def _totals(self) -> ServingTotals:
        return read_totals(self.frontend.metrics, self.frontend.router, time.monotonic())

    def _worker_views(self) -> tuple:
        layout, registered = self.config.layout, self.frontend.workers.workers
        dead = set(self.deployment.dead_workers())
        for worker_id in [w for w in self._starting if w in registered or w in dead]:
            del self._starting[worker_id]
        views = [worker_view(w.worker_id, planner_role(w.role, layout),
                             not (w.is_draining or w.worker_id in self._busy),
                             w.stats.num_waiting, w.stats.num_running, w.stats.kv_usage)
                 for w in registered.values()]
        views += [worker_view(wid, planner_role(role, layout), False)
                  for wid, role in self._starting.items()]
        return tuple(sorted(views, key=lambda v: v.worker_id))

    # ---- acting -------------------------------------------------------------------------------

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    async def _apply(self, action, reason: str) -> None:
        try:
            if isinstance(action, AddWorker):
                self._add(worker_role(action.role))
            elif isinstance(action, RemoveWorker):
                await self._remove(action.worker_id)
            elif isinstance(action, FlipRole):
                await self._flip(action.worker_id, worker_role(action.to_role))
        except Exception:
            logger.exception("planner: %s failed (decided because: %s)", action, reason)
            self.exporter.failed({AddWorker: "add", RemoveWorker: "remove",
                                  FlipRole: "flip"}[type(action)])

    def _add(self, role: str) -> None:
        worker_id = self.ids.next(role)
        device = self.devices.take(worker_id)
        if device is None:
            raise RuntimeError(f"no free device for a new {role} worker")
        template = self.template
        spec = replace(template, worker_id=worker_id, role=role,
                       engine=replace(template.engine, role=role, device=device))
        self.deployment.start_worker(spec)
        self._starting[worker_id] = role
        logger.info("planner: started %s worker %s on %s", role, worker_id, device)

    async def _remove(self, worker_id: str) -> None:
        self._busy.add(worker_id)
        try:
            worker = self.frontend.workers.workers.get(worker_id)
            if worker is not None:
                self.frontend.workers.set_draining(worker_id)
                await self._drain(worker_id, worker.address)
            await asyncio.to_thread(self.deployment.stop_worker, worker_id, STOP_TIMEOUT_S)
            self.frontend.on_removed([worker_id])
            self._starting.pop(worker_id, None)
            self.devices.give_back(worker_id)
            logger.info("planner: removed worker %s", worker_id)
        finally:
            self._busy.discard(worker_id)

    async def _drain(self, worker_id: str, address: str) -> None:
        try:
            reply = await self.clients.stub(address).Drain(
                wpb.DrainRequest(timeout_s=self.drain_timeout_s),
                timeout=self.drain_timeout_s + 10.0)
        except grpc.aio.AioRpcError as err:  # gone already: stopping it is all that is left
            logger.warning("planner: draining worker %s failed (%s)", worker_id, err.code().name)
            return
        logger.info("planner: worker %s %s after %.2f s", worker_id,
                    "drained" if reply.drained else f"still had {reply.num_unfinished} in flight",
                    reply.drain_seconds)

    async def _flip(self, worker_id: str, role: str) -> None:
        worker = self.frontend.workers.workers.get(worker_id)
        if worker is None:
            raise LookupError(f"worker {worker_id} is not registered")
        self._busy.add(worker_id)
        self.frontend.workers.set_draining(worker_id)
        started = time.monotonic()
        try:
            reply = await self.clients.stub(worker.address).SetRole(
                wpb.SetRoleRequest(role=role, drain_timeout_s=self.drain_timeout_s),
                timeout=self.drain_timeout_s + 30.0)
        except grpc.aio.AioRpcError:
            self.frontend.workers.set_draining(worker_id, False)  # it keeps its old role
            raise
        finally:
            self._busy.discard(worker_id)
        record = FlipRecord(worker_id, reply.previous_role, reply.role, reply.drain_seconds,
                            reply.switch_seconds, time.monotonic() - started, reply.pid)
        self.flips.append(record)
        self.exporter.flipped(record.drain_s, record.switch_s, record.total_s)
        logger.info("planner: flipped worker %s from %s to %s in %.2f s (drain %.2f s, switch "
                    "%.3f s), same process pid %d", worker_id, record.from_role, record.to_role,
                    record.total_s, record.drain_s, record.switch_s, record.pid)


def start_planner(config: PlannerConfig, profile_path: str | None, frontend: Frontend,
                  deployment: Deployment, specs: list[WorkerOptions], drain_timeout_s: float,
                  stop: asyncio.Event) -> asyncio.Task | None:
    """The planner's task, running until `stop` is set; None when the planner is off."""
    if config.mode == "off":
        return None
    device = specs[0].engine.device
    path = profile_path or default_profile(specs[0].engine.model, device)
    loop = PlannerLoop(config, PerfModel.load(path), frontend, deployment, specs,
                       planner_devices(device, config.max_workers), drain_timeout_s)
    logger.warning("planner %s: every %.0f s, SLO TTFT %.0f ms ITL %.0f ms, %d GPUs, profile %s",
                   config.mode, config.interval_s, config.ttft_ms, config.itl_ms,
                   config.gpu_budget, path)
    return asyncio.create_task(loop.run(stop), name="planner")


def planner_devices(device: str, max_workers: int) -> list[str]:
    """Devices new workers may get: the CPU, or each visible GPU up to the budget."""
    if not device.startswith("cuda:"):
        return [device]
    import torch
    return [f"cuda:{i}" for i in range(min(torch.cuda.device_count(), max_workers))]
