"""A worker process: `tandem worker --role prefill|decode ...`, started by the deployment layer.

It builds the engine, registers the whole KV cache with a NIXL agent, serves the Worker gRPC API,
registers with the frontend and sends heartbeats. SIGTERM or SIGINT stops it: the gRPC server gets a
short grace period for calls in flight, then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc

from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.launcher.deploy import die_with_parent
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.worker.base import WorkerBase, WorkerOptions, register_and_heartbeat

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
    return NixlKVAgent(options.worker_id, engine.kv_cache,
                       progress_thread=options.role == "prefill", spare_block=engine.spare_block)


def make_worker(options: WorkerOptions) -> WorkerBase:
    engine = LLMEngine(options.engine)
    agent = make_agent(options, engine)
    if options.role == "prefill":
        from tandem.prefill_workers.service import PrefillWorker
        return PrefillWorker(options, engine, agent)
    from tandem.decode_workers.service import DecodeWorker
    return DecodeWorker(options, engine, agent)


async def serve_worker(options: WorkerOptions) -> None:
    worker = make_worker(options)
    server = grpc.aio.server()
    wgrpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port(f"{options.host}:{options.port}")
    await server.start()
    worker.start()
    address = f"{options.host}:{port}"
    logger.info("%s worker %s serving on %s", options.role, options.worker_id, address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(register_and_heartbeat(worker, address)),
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


def add_worker_parser(commands) -> None:
    parser = commands.add_parser("worker", help="one worker process (started by `tandem serve`)")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--role", choices=("prefill", "decode"), required=True)
    parser.add_argument("--frontend", required=True, help="host:port of the frontend's control API")
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--lease-s", type=float, default=30.0)
    parser.add_argument("--transfer-timeout-s", type=float, default=30.0)
    parser.add_argument("--no-kv-transfer", action="store_true")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the frontend) exits")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch threads on a CPU (default: torch's choice)")
    parser.set_defaults(func=worker_main)


def worker_main(args: argparse.Namespace) -> int:
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    if args.cpu_threads:
        import torch
        torch.set_num_threads(args.cpu_threads)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    engine = EngineConfig(
        model=args.model, role=args.role, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization)
    options = WorkerOptions(
        worker_id=args.worker_id, role=args.role, frontend=args.frontend, engine=engine,
        host=args.host, port=args.port, lease_s=args.lease_s,
        transfer_timeout_s=args.transfer_timeout_s, enable_kv_transfer=not args.no_kv_transfer)
    asyncio.run(serve_worker(options))
    return 0
