"""`tandem serve`: a frontend plus N prefill and M decode workers, each in its own process.

Settings come from flags, `TANDEM_*` environment variables and a YAML file (`--config`), in that
order of precedence, into one nested `ServeConfig` (launcher/config.py); each worker gets its spec
serialized. Workers are supervised while serving: a dead one is restarted with backoff
(launcher/supervisor.py) and `/health` says how each pool stands. SIGINT or SIGTERM drains: new
requests are refused, requests in flight finish within `--drain-timeout-s`, then workers are
stopped and the process exits with nothing left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from dataclasses import replace

from tandem.launcher.config import (SETTINGS, ServeConfig, build_serve_config, default_of,
                                    field_type, listed_devices)
from tandem.launcher.deploy import Deployment, LocalDeployment
from tandem.launcher.gc_pauses import freeze_startup_heap
from tandem.launcher.loop_lag import watch_loop_lag
from tandem.launcher.planner_loop import start_planner
from tandem.launcher.supervisor import Supervisor, describe_exit
from tandem.engine.model_info import describe_model
from tandem.engine.tokenizer import load_tokenizer
from tandem.frontend.server import Frontend
from tandem.worker.auth import ensure_secret
from tandem.worker.config import WorkerOptions

logger = logging.getLogger(__name__)


def worker_devices(device: str, num_workers: int) -> list[str]:
    """One device per worker: cpu for all, or one GPU each (cuda:0, cuda:1, ... or the GPUs
    listed, in order)."""
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return ["cpu"] * num_workers
    import torch
    return assign_gpus(device, num_workers, torch.cuda.device_count())


def assign_gpus(device: str, num_workers: int, num_gpus: int) -> list[str]:
    """GPUs for `num_workers` workers (prefill first, then decode) out of `num_gpus` visible:
    cuda:0 upwards for `cuda`, else the listed ones in order."""
    listed = listed_devices(device) or [f"cuda:{i}" for i in range(num_workers)]
    if len(listed) < num_workers:
        raise ValueError(f"{num_workers} workers need {num_workers} GPUs; --device lists "
                         f"{len(listed)} ({device}): list one per worker, prefill workers first")
    chosen = listed[:num_workers]
    missing = [gpu for gpu in chosen if int(gpu.split(":")[1]) >= num_gpus]
    if missing:
        raise ValueError(f"{num_workers} workers need GPUs {', '.join(chosen)}; "
                         f"{num_gpus} visible, so {', '.join(missing)} do not exist")
    return chosen


def worker_specs(config: ServeConfig, frontend: str) -> list[WorkerOptions]:
    """One spec per worker, each with the serve config's engine in the worker's role."""
    roles = ["prefill"] * config.num_prefill + ["decode"] * config.num_decode
    devices = (worker_devices(config.device, len(roles)) if config.launcher == "local"
               else [config.device] * len(roles))  # Ray gives each actor its own GPU
    # Workers on one CPU share its cores instead of each spawning a thread per core.
    cpu_threads = max(1, (os.cpu_count() or 1) // len(roles)) if devices[0] == "cpu" else None
    worker_config = replace(config.worker, host=config.frontend.control_host)
    counters = {"prefill": 0, "decode": 0}
    specs = []
    for role, device in zip(roles, devices):
        engine = replace(config.engine, role=role, device=device)
        # The planner may flip any worker and add a prefill pool to aggregated serving.
        may_change_role = config.planner.mode == "on"
        specs.append(WorkerOptions(
            f"{role}-{counters[role]}", role, frontend, engine, worker_config,
            enable_kv_transfer=config.num_prefill > 0 or may_change_role,  # aggregated: no pulls
            cpu_threads=cpu_threads, may_change_role=may_change_role))
        counters[role] += 1
    secret = ensure_secret()  # the deployment's internal secret travels with each spec
    return [replace(spec, internal_secret=secret) for spec in specs]


async def run_serve(config: ServeConfig, deployment: Deployment) -> int:
    model = describe_model(config.engine.model, config.engine.max_model_len)
    tokenizer = load_tokenizer(None if model.model_dir is None else str(model.model_dir))
    frontend = Frontend(model, tokenizer, config.frontend, config.router, config.engine.block_size)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ensure_secret()  # the deployment's internal secret, for the frontend's side (worker/auth.py)
    await frontend.start()
    try:
        specs = {spec.worker_id: spec for spec in worker_specs(config,
                                                               frontend.control_address)}
        for spec in specs.values():
            deployment.start_worker(spec)
        ready = await frontend.wait_for_workers(
            {"prefill": config.num_prefill, "decode": config.num_decode},
            config.ready_timeout_s, deployment.dead_workers, stop)
        if not ready:
            return 0  # interrupted while starting
        host = config.frontend.host
        scheme = "https" if config.frontend.access.uses_tls else "http"
        print(f"tandem ready: {scheme}://{host}:{config.frontend.http_port} grpc "
              f"{host}:{frontend.grpc_port} model {config.engine.model} "
              f"({config.num_prefill} prefill, {config.num_decode} decode)", flush=True)
        freeze_startup_heap()
        lag_watch = asyncio.create_task(watch_loop_lag("frontend"))  # noqa: F841 (as planner)
        planner = start_planner(  # noqa: F841 (the task must stay referenced while serving)
            config.planner, config.planner_profile, frontend, deployment,
            worker_specs(config, frontend.control_address), config.drain_timeout_s, stop)
        await supervise(frontend, deployment, specs, stop)
        logger.warning("draining: refusing new requests, waiting for %d in flight",
                       frontend.pipeline.num_inflight)
        await frontend.drain(config.drain_timeout_s)
        return 0
    finally:
        await frontend.stop()
        deployment.stop_all(timeout_s=10.0)
        print("tandem stopped", flush=True)


async def supervise(frontend: Frontend, deployment: Deployment, specs: dict[str, WorkerOptions],
                    stop: asyncio.Event, interval_s: float = 0.5) -> None:
    """Until `stop`: restart dead workers with backoff (launcher/supervisor.py), drop them and the
    silent ones from the frontend at once, and tell the frontend how its pools stand."""
    supervisor = Supervisor()
    started_s = time.monotonic()
    for spec in specs.values():
        supervisor.on_started(spec.worker_id, spec.role, started_s)
    while not stop.is_set():
        _supervise_once(frontend, deployment, specs, supervisor, time.monotonic())
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass


def _supervise_once(frontend: Frontend, deployment: Deployment, specs: dict[str, WorkerOptions],
                    supervisor: Supervisor, now_s: float) -> None:
    dead = deployment.dead_workers()
    for worker_id in dead:
        code = deployment.exit_code(worker_id)
        how = describe_exit(-1 if code is None else code)
        deployment.stop_worker(worker_id, timeout_s=0.0)  # forget the exited process
        if worker_id not in specs:  # started by the planner, which replaces its own workers
            logger.warning("worker %s %s", worker_id, how)
            continue
        delay_s = supervisor.on_exit(worker_id, -1 if code is None else code, now_s)
        logger.warning("worker %s %s; restarting it in %.0f s", worker_id, how, delay_s)
    frontend.forget_workers(dead)
    for worker_id in supervisor.due(now_s):
        logger.warning("restarting worker %s", worker_id)
        deployment.start_worker(specs[worker_id])
        supervisor.on_started(worker_id, specs[worker_id].role, now_s)
    registered = frontend.workers.workers
    supervisor.observe_ready(set(registered))
    statuses = []
    for role in ("prefill", "decode"):
        ready = {w for w, state in registered.items() if state.role == role}
        if not supervisor.is_pool_ready(role, ready):
            statuses.append(supervisor.pool_status(role, ready, now_s))
    frontend.report_pools(statuses)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Fill `tandem serve`'s parser (launcher/cli.py registers the command)."""
    parser.description = (
        "Each setting is a flag, a TANDEM_<NAME> environment variable (TANDEM_NUM_DECODE=2) and a "
        "key of the --config YAML file (num_decode: 2). Precedence: flag > environment > YAML > "
        "default.")
    parser.add_argument("--config", help="YAML file whose keys mirror these flags")
    for setting in SETTINGS:
        _add_setting_flag(parser, setting)
    parser.set_defaults(func=serve_main)


def _add_setting_flag(parser: argparse.ArgumentParser, setting) -> None:
    """--name for one setting: a list for tuple fields and --slo, --x/--no-x for booleans."""
    kind = "str" if setting.name == "slo" else field_type(setting).split("|")[0].strip()
    default = default_of(setting)
    if setting.name == "slo" or default is None or (kind.startswith("tuple") and not default):
        default = "unset"
    flag = "--" + setting.name.replace("_", "-")
    # `tandem --log-level X` before the command also works: a distinct dest keeps the two apart.
    dest = "serve_log_level" if setting.name == "log_level" else setting.name
    help_text = f"{setting.help} (default: {default})"
    metavar = setting.name.upper()
    if kind == "bool":
        parser.add_argument(flag, dest=dest, default=None, action=argparse.BooleanOptionalAction,
                            help=help_text)
        return
    parser.add_argument(flag, dest=dest, default=None,
                        type={"int": int, "float": float}.get(kind, str),
                        nargs="+" if setting.name == "slo" or kind.startswith("tuple") else None,
                        metavar=metavar, help=help_text)


def load_serve_config(args: argparse.Namespace) -> ServeConfig:
    flags = {s.name: getattr(args, s.name, None) for s in SETTINGS if s.name != "log_level"}
    # `serve --log-level` wins over `tandem --log-level`, which wins over the environment.
    flags["log_level"] = getattr(args, "serve_log_level", None) or getattr(args, "log_level", None)
    return build_serve_config(flags, args.config)


def make_deployment(config: ServeConfig, log_level: str) -> tuple[ServeConfig, Deployment]:
    """The deployment `--launcher` names; Ray is imported only for `ray`."""
    if config.launcher == "local":
        return config, LocalDeployment(log_level)
    from tandem.launcher.ray_deploy import RayDeployment
    deployment = RayDeployment(config.ray, config.frontend.control_host, log_level,
                               num_workers=config.num_prefill + config.num_decode)
    return replace(config, device=deployment.resolve_device(config.device)), deployment


def serve_main(args: argparse.Namespace) -> int:
    config = load_serve_config(args)
    logging.getLogger().setLevel(config.log_level.upper())  # the environment or YAML may set it
    config, deployment = make_deployment(config, config.log_level.upper())
    return asyncio.run(run_serve(config, deployment))
