"""`tandem serve`: a frontend plus N prefill and M decode workers, each in its own process.

Flags can also come from a YAML file (`--config`), whose keys mirror the flags (`num_prefill`,
`http_port`, ...); flags given on the command line win. SIGINT or SIGTERM drains: new requests are
refused, requests in flight finish within `--drain-timeout-s`, then workers are stopped and the
process exits with nothing left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import dataclass, fields

import yaml

from tandem.launcher.deploy import Deployment, LocalDeployment, WorkerSpec
from tandem.engine.model_info import describe_model
from tandem.engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ServeConfig:
    model: str = "random:tiny"
    num_prefill: int = 1
    num_decode: int = 1
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    device: str = "auto"               # auto | cpu | cuda
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    gpu_memory_utilization: float = 0.9
    remote_prefill_min_tokens: int = 256
    max_prefill_queue: int = 8
    router_mode: str = "kv"            # kv | round-robin | random | least-loaded
    # Cost of one uncached prompt block against one active block. 4 rather than DESIGN.md's
    # starting 1: it kept shared prefixes together (97% against 84% of the ideal hit rate) at a
    # TTFT p50 within 3% or better in every run of benchmarks/RESULTS.md ("KV-aware routing").
    kv_overlap_weight: float = 4.0
    router_temperature: float = 0.0    # 0: always the cheapest worker; > 0: sample by cost
    kv_lease_s: float = 30.0
    transfer_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    ready_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.num_decode < 1:
            raise ValueError(f"num_decode must be at least 1, got {self.num_decode}")
        if self.num_prefill < 0:
            raise ValueError(f"num_prefill must be 0 or more, got {self.num_prefill}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


def worker_devices(device: str, num_workers: int) -> list[str]:
    """One device per worker: cpu for all, or one GPU each (cuda:0, cuda:1, ...)."""
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return ["cpu"] * num_workers
    import torch
    num_gpus = torch.cuda.device_count()
    if num_gpus < num_workers:
        raise ValueError(f"{num_workers} workers need {num_workers} GPUs; {num_gpus} visible")
    return [f"cuda:{i}" for i in range(num_workers)]


def worker_specs(config: ServeConfig, frontend: str) -> list[WorkerSpec]:
    roles = ["prefill"] * config.num_prefill + ["decode"] * config.num_decode
    devices = worker_devices(config.device, len(roles))
    args = ["--block-size", str(config.block_size), "--max-num-seqs", str(config.max_num_seqs),
            "--max-num-batched-tokens", str(config.max_num_batched_tokens),
            "--gpu-memory-utilization", str(config.gpu_memory_utilization),
            "--lease-s", str(config.kv_lease_s),
            "--transfer-timeout-s", str(config.transfer_timeout_s)]
    if config.num_kv_blocks is not None:
        args += ["--num-kv-blocks", str(config.num_kv_blocks)]
    if config.max_model_len is not None:
        args += ["--max-model-len", str(config.max_model_len)]
    if config.num_prefill == 0:
        args.append("--no-kv-transfer")  # aggregated: nothing to pull
    if devices and devices[0] == "cpu":
        # Workers on one CPU share its cores instead of each spawning a thread per core.
        args += ["--cpu-threads", str(max(1, (os.cpu_count() or 1) // len(roles)))]
    counters = {"prefill": 0, "decode": 0}
    specs = []
    for role, device in zip(roles, devices):
        specs.append(WorkerSpec(f"{role}-{counters[role]}", role, frontend, config.model,
                                device, tuple(args)))
        counters[role] += 1
    return specs


async def run_serve(config: ServeConfig, deployment: Deployment) -> int:
    from tandem.frontend.server import Frontend, FrontendConfig
    from tandem.router.kv_policy import KVPolicyConfig
    from tandem.router.routing import RoutingConfig

    model = describe_model(config.model, config.max_model_len)
    tokenizer = load_tokenizer(None if model.model_dir is None else str(model.model_dir))
    frontend = Frontend(model, tokenizer, FrontendConfig(
        host=config.host, http_port=config.http_port, grpc_port=config.grpc_port,
        block_size=config.block_size,
        routing=RoutingConfig(config.remote_prefill_min_tokens, config.max_prefill_queue,
                              KVPolicyConfig(config.router_mode, config.kv_overlap_weight,
                                             config.router_temperature))))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await frontend.start()
    try:
        for spec in worker_specs(config, frontend.control_address):
            deployment.start_worker(spec)
        ready = await frontend.wait_for_workers(
            {"prefill": config.num_prefill, "decode": config.num_decode},
            config.ready_timeout_s, deployment.dead_workers, stop)
        if not ready:
            return 0  # interrupted while starting
        print(f"tandem ready: http://{config.host}:{config.http_port} grpc "
              f"{config.host}:{frontend.grpc_port} model {config.model} "
              f"({config.num_prefill} prefill, {config.num_decode} decode)", flush=True)
        while not stop.is_set():
            frontend.forget_workers(deployment.dead_workers())
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        logger.warning("draining: refusing new requests, waiting for %d in flight",
                       frontend.pipeline.num_inflight)
        await frontend.drain(config.drain_timeout_s)
        return 0
    finally:
        await frontend.stop()
        deployment.stop_all(timeout_s=10.0)
        print("tandem stopped", flush=True)


def add_serve_parser(commands) -> None:
    parser = commands.add_parser("serve", help="serve a model: frontend, prefill and decode workers")
    parser.add_argument("--config", help="YAML file whose keys mirror these flags")
    defaults = ServeConfig()
    flag_types = {"int": int, "int | None": int, "float": float, "str": str}
    for f in fields(ServeConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=flag_types[f.type],
                            default=None, help=f"default: {getattr(defaults, f.name)}")
    parser.set_defaults(func=serve_main)


def load_serve_config(args: argparse.Namespace) -> ServeConfig:
    values: dict = {}
    if args.config:
        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
        known = {f.name for f in fields(ServeConfig)}
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"{args.config}: unknown setting {key!r}")
            values[name] = value
    for f in fields(ServeConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return ServeConfig(**values)


def serve_main(args: argparse.Namespace) -> int:
    config = load_serve_config(args)
    return asyncio.run(run_serve(config, LocalDeployment(args.log_level.upper())))
