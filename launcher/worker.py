"""A worker process: `tandem worker`, started by the deployment layer with its spec (a serialized
`WorkerOptions`) in the environment variable TANDEM_WORKER_SPEC.

It builds the engine, registers the whole KV cache with a NIXL agent, serves the Worker gRPC API,
registers with the frontend and sends heartbeats. SIGTERM or SIGINT stops it: the gRPC server gets a
short grace period for calls in flight, then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import grpc

from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.launcher.addresses import advertised_host, restrict_ucx_to
from tandem.launcher.deploy import SPEC_ENV, die_with_parent
from tandem.launcher.gc_pauses import freeze_startup_heap
from tandem.launcher.loop_lag import watch_loop_lag
from tandem.engine.llm_engine import LLMEngine
from tandem.launcher.role_switch import RoleSwitchingWorker
from tandem.worker.base import register_and_heartbeat
from tandem.worker.auth import adopt_secret, internal_server
from tandem.worker.config import WorkerOptions

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
# The engine steps in a thread while the event loop serves gRPC and polls KV pulls. Python makes a
# thread that wants the GIL wait up to this long for one running Python code (default 5 ms): with
# the default, a decode worker busy with 8 requests let a 4k-token pull sit 5 ms between polls.
GIL_SWITCH_INTERVAL_S = 0.00025


def make_agent(options: WorkerOptions, engine: LLMEngine):
    if not options.enable_kv_transfer:
        return None
    from tandem.kv_transfer import NixlKVAgent
    # Prefill workers own the blocks that are read; decode workers only read (nixl_connector.py).
    # A worker the planner may flip keeps one agent for life, so it runs the owner's thread in
    # either role (benchmarks/RESULTS.md, "Planner": what that costs a decode worker's pulls).
    # The thread polls without rest, a whole core even when idle (103% of one for an idle CPU
    # prefill worker), for pulls that were measured faster with it on GPUs only; on a CPU a read
    # completes at the owner's next notification poll instead (prefill_workers/service.py, every
    # 2 ms), and the core goes to the steps.
    progress_thread = ((options.role == "prefill" or options.may_change_role)
                       and engine.kv_cache.is_cuda)
    return NixlKVAgent(options.worker_id, engine.kv_cache, progress_thread=progress_thread,
                       spare_block=engine.spare_block)


def make_worker(options: WorkerOptions) -> RoleSwitchingWorker:
    engine = LLMEngine(options.engine)
    return RoleSwitchingWorker(options, engine, make_agent(options, engine))


async def serve_worker(options: WorkerOptions, stop: asyncio.Event | None = None,
                       node_ip: str | None = None) -> None:
    """Serve until `stop` is set (None: until SIGTERM or SIGINT, which only the main thread can
    catch). `node_ip`: what to advertise when bound to a wildcard address (addresses.py)."""
    restrict_ucx_to(options.host)  # before the NIXL agent creates its UCX context
    adopt_secret(options.internal_secret)  # before any internal server or channel exists
    worker = make_worker(options)
    server = internal_server()  # the frontend and other workers only (worker/auth.py)
    wgrpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port(f"{options.host}:{options.port}")
    await server.start()
    worker.start()
    address = f"{advertised_host(options.host, node_ip)}:{port}"
    worker.address = address
    freeze_startup_heap()  # the engine, its model and graphs stay out of every later collection
    logger.info("%s worker %s serving on %s", options.role, options.worker_id, address)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(register_and_heartbeat(worker, address)),
             asyncio.create_task(watch_loop_lag(f"worker {options.worker_id}")),
             asyncio.create_task(worker.background())]
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await server.stop(SHUTDOWN_GRACE_S)
    await worker.async_engine.stop()
    await worker.close()
    if worker.agent is not None:
        worker.agent.close()
    for task in done:
        if task is not stopped and task.exception() is not None:
            raise task.exception()
    logger.info("worker %s stopped", options.worker_id)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Fill `tandem worker`'s parser (launcher/cli.py registers the command)."""
    parser.description = (f"Reads its spec, a JSON WorkerOptions, from the environment variable "
                          f"{SPEC_ENV} (not the command line, which every local user can read).")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the frontend) exits")
    parser.set_defaults(func=worker_main)


def worker_main(args: argparse.Namespace) -> int:
    spec = os.environ.pop(SPEC_ENV, None)
    if spec is None:
        raise ValueError(f"no worker spec: `tandem worker` is started by `tandem serve`, which "
                         f"passes it in {SPEC_ENV}")
    options = WorkerOptions.from_json(spec)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    configure_process(options)
    asyncio.run(serve_worker(options))
    return 0


def configure_process(options: WorkerOptions) -> None:
    """Process-wide settings a worker needs, whichever launcher started it."""
    if options.cpu_threads:
        import torch
        torch.set_num_threads(options.cpu_threads)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
