"""Deployment: starting and stopping worker processes.

`Deployment` is the one small interface the launcher uses; `LocalDeployment` runs each worker as a
child process of this machine (`tandem worker`, its spec in the environment), one GPU each when GPUs
are used. A Ray implementation provides the same methods with Ray actors.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from typing import Protocol

from tandem.launcher.safe_start import python_module_command
from tandem.worker.config import WorkerOptions

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
SPEC_ENV = "TANDEM_WORKER_SPEC"  # the worker's spec travels here, not on its command line


class Deployment(Protocol):
    def start_worker(self, spec: WorkerOptions) -> None: ...

    def stop_worker(self, worker_id: str, timeout_s: float) -> None: ...

    def dead_workers(self) -> list[str]:
        """Workers started here whose process has exited."""
        ...

    def exit_code(self, worker_id: str) -> int | None:
        """How a dead worker's process ended, as Popen reports it (negative: killed by that
        signal); None while it runs or when unknown. Read it before stop_worker forgets it."""
        ...

    def stop_all(self, timeout_s: float) -> None: ...


def die_with_parent(parent_pid: int) -> None:
    """Called by a worker at start: it must not outlive the frontend that started it, even one
    killed with SIGKILL. (Set here, not in a preexec_fn: running Python between fork and exec in a
    process with gRPC threads is unsafe.)"""
    if sys.platform == "linux":
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        raise SystemExit(f"parent process {parent_pid} is gone")


class LocalDeployment:
    def __init__(self, log_level: str = "WARNING"):
        self.log_level = log_level
        self.processes: dict[str, subprocess.Popen] = {}

    def start_worker(self, spec: WorkerOptions) -> None:
        env = dict(os.environ)
        device = spec.engine.device
        if device.startswith("cuda:"):
            # One GPU per worker: the worker sees only its own, as cuda:0.
            env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
            spec = replace(spec, engine=replace(spec.engine, device="cuda"))
        env[SPEC_ENV] = spec.to_json()
        # Not `python -m`: that would import a `tandem/` folder in the current directory.
        command = python_module_command("tandem.launcher.cli", [
            "--log-level", self.log_level, "worker", "--parent-pid", str(os.getpid())])
        logger.info("starting %s worker %s on %s", spec.role, spec.worker_id, device)
        self.processes[spec.worker_id] = subprocess.Popen(command, env=env)

    def stop_worker(self, worker_id: str, timeout_s: float) -> None:
        process = self.processes.pop(worker_id, None)
        if process is not None:
            _terminate([process], timeout_s)

    def dead_workers(self) -> list[str]:
        return [w for w, p in self.processes.items() if p.poll() is not None]

    def exit_code(self, worker_id: str) -> int | None:
        process = self.processes.get(worker_id)
        return None if process is None else process.poll()

    def stop_all(self, timeout_s: float) -> None:
        processes = list(self.processes.values())
        self.processes.clear()
        _terminate(processes, timeout_s)


def _terminate(processes: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL whatever is still there after timeout_s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("worker pid %d did not stop in %.0f s; killing it", process.pid,
                           timeout_s)
            process.kill()
            process.wait()
