"""The frontend process's servers: OpenAI HTTP, public gRPC (with health and reflection), and the
internal Control API that workers register with. It owns the worker registry, the router and the
request pipeline, and it drains: once draining, new requests are refused and health reports
NOT_SERVING while requests in flight run to completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace

import grpc
import uvicorn

from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.engine.model_info import ModelInfo
from tandem.frontend.access_log import AccessLogMiddleware, GrpcRequestIdInterceptor
from tandem.frontend.control_service import ControlService
from tandem.frontend.admission import AdmissionConfig, AdmissionGate
from tandem.frontend.grpc_api import GenerationService, add_public_services, set_health
from tandem.frontend.kserve import KServeService, add_kserve_service
from tandem.frontend.metrics import FrontendMetrics
from tandem.frontend.model_serving import ModelServingConfig, serve_model, served_names
from tandem.frontend.openai_api import create_app, default_rules, tokenizer_thread
from tandem.frontend.pipeline import Pipeline
from tandem.frontend.public_auth import (AccessConfig, add_public_port, grpc_interceptors,
                                         protect_http, uvicorn_tls)
from tandem.frontend.stats_log import WorkerStatsLog
from tandem.frontend.tool_parsers import make_parser
from tandem.frontend.kv_follower import KVEventFollower
from tandem.frontend.request_rules import RequestLimits
from tandem.router.routing import Router, RoutingConfig
from tandem.router.worker_registry import (DEAD_AFTER_S, SUSPECT_AFTER_S, WorkerRegistry,
                                           WorkerState)
from tandem.worker.auth import internal_server

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    host: str = "127.0.0.1"          # loopback unless told otherwise (DESIGN.md, "Addresses")
    http_port: int = 8000
    grpc_port: int = 50051
    control_port: int = 0            # the internal API; 0 picks a free port
    control_host: str = "127.0.0.1"  # where the internal API binds; 0.0.0.0 opens it to a cluster
    heartbeat_interval_s: float = 0.5
    # Worker liveness (router/worker_registry.py). Late is not dead: a worker that misses its
    # heartbeats for suspect_after_s (six intervals: on a quiet host they come every 0.5 s) is
    # routed nothing new, but its requests in flight go on and its next heartbeat makes it
    # routable again; only dead_after_s of silence, or evidence that its process is gone (the
    # launcher saw it exit, a call found its port closed, keepalive gave up on the connection),
    # ends its streams and migrates them. With one 5 s threshold for both, the 10,000-request
    # soak on a starved 2-core host (benchmarks/RESULTS.md) dropped live decode workers whose
    # heartbeats came more than 5 s apart and ended 1,177 streams that were still running.
    suspect_after_s: float = SUSPECT_AFTER_S   # 3 s
    dead_after_s: float = DEAD_AFTER_S         # 30 s: as long as keepalive takes (keepalive.py)
    # Client-facing bounds, each explained where it is defined (request_rules, admission).
    limits: RequestLimits = field(default_factory=RequestLimits)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    access: AccessConfig = field(default_factory=AccessConfig)  # API key, TLS (public_auth.py)
    # Served names, chat template, sampling defaults (model_serving.py).
    serving: ModelServingConfig = field(default_factory=ModelServingConfig)
    # How replies' tool calls are read (tool_parsers): llama3_json or hermes; None picks the one
    # the chat template calls for, and a template that shows none serves no tools.
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None:
            make_parser(self.tool_call_parser)   # an unknown name fails at start, naming the choices
        for name in ("http_port", "grpc_port", "control_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be a TCP port in [0, 65535], got {port}")
        if not 0 < self.heartbeat_interval_s < self.suspect_after_s < self.dead_after_s:
            raise ValueError("need 0 < heartbeat_interval_s < worker_suspect_after_s < "
                             f"worker_dead_after_s, got {self.heartbeat_interval_s}, "
                             f"{self.suspect_after_s} and {self.dead_after_s}")


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the serve command owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class Frontend:
    def __init__(self, model: ModelInfo, tokenizer, config: FrontendConfig,
                 routing: RoutingConfig, block_size: int):
        self.config = config
        # Workers register under --model; clients see the served names (model_serving.py).
        self.workers = WorkerRegistry(model.name, block_size, config.suspect_after_s,
                                      config.dead_after_s)
        names = served_names(config.serving, model.name)
        model = replace(serve_model(config.serving, model, tokenizer), name=names[0])
        self.metrics = FrontendMetrics(self.workers)
        self.router = Router(routing, block_size)
        self.pipeline = Pipeline(model, tokenizer, self.workers, self.router, self.metrics)
        self.follower = KVEventFollower(self.router.indexes, self.pipeline.stub,
                                        on_gone=self.on_connection_lost)
        # Both APIs share one admission book, one set of rules and the one tokenizer thread.
        self.gate = AdmissionGate(self.pipeline, config.admission)
        self.rules = replace(default_rules(self.pipeline, tokenizer, config.limits,
                                           model.config.vocab_size), served_model_names=names)
        self.tokenize_executor = tokenizer_thread()
        self.generation = GenerationService(self.gate, tokenizer, self.rules, self.tokenize_executor,
                                            model.default_sampling_params())
        self.kserve = KServeService(self.gate, tokenizer, self.rules, self.tokenize_executor,
                                    model.default_sampling_params())
        self.app = create_app(self.gate, tokenizer, self.metrics.registry, limits=config.limits,
                              rules=self.rules, tokenize_executor=self.tokenize_executor,
                              defaults=model.default_sampling_params(),
                              tool_call_parser=config.tool_call_parser)
        self.app.add_middleware(AccessLogMiddleware)
        self.stats_log = WorkerStatsLog(self.workers, self.metrics.requests)
        self.http: _QuietServer | None = None
        self.http_task: asyncio.Task | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.control_server: grpc.aio.Server | None = None
        self.health = None
        self._serving = False  # what the gRPC health service says
        self.grpc_port = 0
        self.control_address = ""

    async def start(self) -> None:
        config = self.config
        self.control_server = internal_server()  # workers only (worker/auth.py)
        wgrpc.add_ControlServicer_to_server(
            ControlService(self.workers, config.heartbeat_interval_s, self), self.control_server)
        control_port = self.control_server.add_insecure_port(
            f"{config.control_host}:{config.control_port}")
        await self.control_server.start()
        self.control_address = f"{config.control_host}:{control_port}"
        message_limit = config.limits.max_request_bytes
        interceptors = [GrpcRequestIdInterceptor(), *grpc_interceptors(config.access)]
        self.grpc_server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", message_limit),
            ("grpc.max_send_message_length", message_limit)])
        self.health = add_public_services(self.grpc_server, self.generation)
        add_kserve_service(self.grpc_server, self.kserve)
        self.grpc_port = add_public_port(self.grpc_server, f"{config.host}:{config.grpc_port}",
                                         config.access)
        protect_http(self.app, config.access)
        await self.grpc_server.start()
        self.http = _QuietServer(uvicorn.Config(self.app, host=config.host, port=config.http_port,
                                                log_level="warning", access_log=False,
                                                **uvicorn_tls(config.access)))
        self.http_task = asyncio.create_task(self.http.serve())
        self.stats_log.start()
        while not self.http.started:
            if self.http_task.done():
                self.http_task.result()
                raise RuntimeError(f"HTTP server could not start on port {config.http_port}")
            await asyncio.sleep(0.02)
        logger.info("frontend listening: http %s:%d, grpc %s:%d, control %s", config.host,
                    config.http_port, config.host, self.grpc_port, self.control_address)

    async def wait_for_workers(self, expected: dict[str, int], timeout_s: float,
                               dead_workers, stopping: asyncio.Event) -> bool:
        """Until every expected worker has registered: True then, False if `stopping` was set
        first; raises when a worker died or time ran out."""
        deadline = time.monotonic() + timeout_s
        while any(self.workers.count(role) < n for role, n in expected.items()):
            if stopping.is_set():
                return False
            dead = dead_workers()
            if dead:
                raise RuntimeError(f"worker(s) {', '.join(dead)} exited before registering")
            if time.monotonic() > deadline:
                counts = {role: self.workers.count(role) for role in expected}
                raise RuntimeError(f"workers not ready after {timeout_s:.0f} s: registered "
                                   f"{counts}, expected {expected}")
            await asyncio.sleep(0.05)
        self.pipeline.ready = True
        self._serving = True
        set_health(self.health, serving=True)
        return True

    # ---- worker lifecycle (called by the Control service and the serve loop) ------------------

    def on_registered(self, worker: WorkerState) -> None:
        old_role = self.follower.roles.get(worker.worker_id)
        if old_role is not None and old_role != worker.role:
            # A role flip: the worker leaves the old pool's load books (its index goes in follow).
            self.router.remove_worker(worker.worker_id, old_role)
        self.follower.follow(worker)

    def on_heartbeat(self, worker: WorkerState) -> None:
        self.router.on_worker_stats(worker)

    def on_removed(self, worker_ids: list[str], reason: str = "it deregistered") -> None:
        for worker_id in worker_ids:
            worker = self.workers.workers.get(worker_id)
            if worker is not None:
                self.follower.forget(worker_id)
                self.router.remove_worker(worker_id, worker.role)
                self.workers.deregister(worker_id, reason)

    def on_connection_lost(self, worker: WorkerState, reason: str) -> None:
        """The worker instance's connection broke: it is dead (not one that replaced it)."""
        current = self.workers.workers.get(worker.worker_id)
        if current is not None and current.address == worker.address:
            logger.warning("dropping %s worker %s: %s", worker.role, worker.worker_id, reason)
            self.on_removed([worker.worker_id], reason)

    def forget_workers(self, dead_worker_ids: list[str]) -> None:
        """Drop workers whose process died and those silent past dead_after_s; mark the late
        ones suspect (routed nothing new, their requests go on)."""
        self.on_removed(dead_worker_ids, "its process exited")
        self.on_removed(self.workers.sweep(time.monotonic()),
                        f"no heartbeat for {self.config.dead_after_s:.0f} s")

    def report_pools(self, statuses: list[str]) -> None:
        """The launcher's account of each pool that lacks workers ("decode pool has 0 of 1 workers
        ready; decode-0 died (signal 9, SIGKILL), restarting in 2 s"): what /health and refused
        requests say while no decode worker is ready. The gRPC health service follows too."""
        self.pipeline.pool_status = "; ".join(statuses)
        serving = self.pipeline.is_ready and not self.pipeline.is_draining
        if serving != self._serving:
            self._serving = serving
            set_health(self.health, serving=serving)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait for those in flight; False if some were still running."""
        self.pipeline.draining = True
        self._serving = False
        set_health(self.health, serving=False)
        try:
            await asyncio.wait_for(self.pipeline.idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            logger.warning("%d requests still running after %.0f s of draining",
                           self.pipeline.num_inflight, timeout_s)
            return False

    async def stop(self) -> None:
        await self.stats_log.stop()
        if self.http is not None:
            self.http.should_exit = True
            await asyncio.gather(self.http_task, return_exceptions=True)
        for server in (self.grpc_server, self.control_server):
            if server is not None:
                await server.stop(1.0)
        await self.follower.close()
        await self.pipeline.close()
        self.tokenize_executor.shutdown(wait=False, cancel_futures=True)
