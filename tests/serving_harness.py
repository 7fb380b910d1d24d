"""Starts `tandem serve` as a real process for tests and stops it, leaving nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    http_url: str
    grpc_address: str
    lines: list[str] = field(default_factory=list)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels` (0 when absent)."""
        text = httpx.get(f"{self.http_url}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


def start_server(*args: str, timeout_s: float = 180.0, env: dict[str, str] | None = None,
                 log_level: str = "WARNING") -> Server:
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "tandem.launcher.cli", "--log-level", log_level, "serve",
               "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                     **(env or {})})
    server = Server(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    wait_ready(server, timeout_s)
    return server


def wait_ready(server: Server, timeout_s: float = 180.0) -> None:
    """Collect the server's output lines (in the background, for its life) until it says it is
    ready; stop it and raise with its last lines if it exits or takes longer than timeout_s."""
    ready = threading.Event()

    def pump() -> None:
        for line in server.process.stdout:
            server.lines.append(line)
            if line.startswith("tandem ready"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.2):
        if server.process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("tandem serve did not become ready:\n" + "".join(server.lines[-60:]))


# The frontend's line for a worker's registration: worker id, role, address of its Worker service.
REGISTERED = re.compile(r"worker (\S+) registered: (\w+) at (\S+),")


def registered_workers(server: Server) -> dict[str, tuple[str, str]]:
    """worker id -> (role, address) from the frontend's log: each worker's last registration,
    without the workers the planner has removed since."""
    workers: dict[str, tuple[str, str]] = {}
    for line in server.lines:
        if match := REGISTERED.search(line):
            workers[match[1]] = (match[2], match[3])
        elif match := re.search(r"planner: removed worker (\S+)", line):
            workers.pop(match[1], None)
    return workers


def worker_pid(server: Server, worker_id: str) -> int:
    """Pid of the server's worker process with this id (a restarted worker has a new one)."""
    for pid in worker_pids(server):
        spec = _spec_of(pid)
        if spec is not None and json.loads(spec)["worker_id"] == worker_id:
            return pid
    raise LookupError(f"no worker process {worker_id}")


def worker_spec(server: Server, worker_id: str) -> str:
    """The launcher's spec of one of the server's workers (a WorkerOptions as JSON)."""
    spec = _spec_of(worker_pid(server, worker_id))
    if spec is None:
        raise LookupError(f"worker process {worker_id} exited")
    return spec.decode()


def _spec_of(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except FileNotFoundError:
        return None
    return environ.get(b"TANDEM_WORKER_SPEC")


def worker_pids(server: Server) -> list[int]:
    """Pids of the server's worker processes (its children)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server.process.pid)],
                         capture_output=True, text=True).stdout
    return [int(p) for p in re.findall(r"\d+", out)]
