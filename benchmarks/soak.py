"""A bounded soak of `tandem serve` with faults: many requests, client cancellations, workers killed.

  python benchmarks/soak.py [--num-requests 10000] [--concurrency 256] [--cancel-fraction 0.2]
                            [--num-kills 2] [--num-decode 2] [--json out.json]

Starts `tandem serve` on the CPU (random:tiny, 1 prefill + `--num-decode` decode workers, every
prompt long enough to be prefilled remotely) and streams `--num-requests` greedy completions at
`--concurrency`, with random prompts (20 to 300 tokens) and lengths (8 to 64 tokens). A fraction of
the clients leave at a random moment of their stream. While the load runs, a decode worker is
SIGKILLed `--num-kills` times (at even fractions of the requests, alternating workers); the launcher
restarts it and its requests migrate to the other decode worker.

Reports:
- lost: requests that neither finished, nor were cancelled by their client, nor got an error, within
  `--request-timeout-s` (target 0);
- errors by status (5xx beyond the killed worker's in-flight requests when no other decode worker
  exists: target 0; overload refusals, 429/503 with Retry-After, are counted apart);
- leaked blocks: pinned requests and used KV blocks on every worker once the load has ended, right
  away and after the lease (target 0);
- RSS of the frontend and of each worker before and after (a restarted worker is a new process);
- migrations and restarts, from the frontend's metrics and log;
- liveness, from the frontend's log: how often a worker's heartbeats were late (suspect: routed
  nothing new, its streams untouched), the longest silence after which one came back, and how
  many workers were declared dead for silence (router/worker_registry.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

WORDS = ("lighthouse keeper ship harbor storm night lamp wave rock gull fog tide north sail "
         "rope anchor beacon coast island current").split()


@dataclass
class Outcomes:
    completed: int = 0
    cancelled: int = 0             # by the client, on purpose
    lost: int = 0                  # no end within the request timeout
    errors: Counter = field(default_factory=Counter)  # "503 worker_unavailable" -> count
    messages: Counter = field(default_factory=Counter)  # error message -> count
    latencies_s: list[float] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--cancel-fraction", type=float, default=0.2)
    parser.add_argument("--num-kills", type=int, default=2)
    parser.add_argument("--num-decode", type=int, default=2)
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--kv-lease-s", type=float, default=10.0)
    parser.add_argument("--request-timeout-s", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the summary here")
    return parser.parse_args()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`tandem serve` as a child process, its output kept for the report."""

    def __init__(self, args: argparse.Namespace):
        self.http_port = free_port()
        command = [sys.executable, "-m", "tandem.launcher.cli", "serve", "--device", "cpu",
                   "--num-prefill", "1", "--num-decode", str(args.num_decode),
                   "--num-kv-blocks", str(args.num_kv_blocks), "--remote-prefill-min-tokens",
                   "16", "--kv-lease-s", str(args.kv_lease_s), "--http-port",
                   str(self.http_port), "--grpc-port", str(free_port())]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http_port}"

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("tandem ready"):
                self.ready.set()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        if not self.ready.wait(timeout_s):
            self.stop()
            raise RuntimeError("tandem serve did not start:\n" + "".join(self.lines[-40:]))

    def worker_pids(self) -> dict[str, int]:
        """Worker id -> pid, from each child's spec in its environment."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.process.pid)],
                             capture_output=True, text=True).stdout
        pids = {}
        for pid in map(int, re.findall(r"\d+", out)):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            except OSError:
                continue
            if b"TANDEM_WORKER_SPEC" in env:
                pids[json.loads(env[b"TANDEM_WORKER_SPEC"])["worker_id"]] = pid
        return pids

    def metrics(self) -> dict[str, float]:
        """'name{labels}' -> value, for the samples the report reads."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        wanted = ("tandem_kv_pinned_requests", "vllm:kv_cache_usage_perc",
                  "vllm:num_requests_running", "tandem_request_migrations_total",
                  "tandem_kv_transfer_fallback_total", "tandem_remote_prefill_total",
                  "tandem_local_prefill_total")
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith(wanted)}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_of(serve: Serve) -> dict[str, float | None]:
    return {"frontend": rss_mib(serve.process.pid),
            **{w: rss_mib(p) for w, p in sorted(serve.worker_pids().items())}}


async def one_request(client: httpx.AsyncClient, index: int, rng: random.Random,
                      cancel: bool, timeout_s: float, outcomes: Outcomes) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 300)))
    body = {"model": "random:tiny", "prompt": f"{index} {prompt}", "stream": True,
            "max_tokens": rng.randint(8, 64), "temperature": 0.0, "ignore_eos": True}
    leave_after = rng.randint(0, 20) if cancel else None
    started = time.monotonic()
    try:
        outcome = await asyncio.wait_for(_stream(client, body, leave_after), timeout_s)
    except asyncio.TimeoutError:
        outcome = "lost"
    except httpx.HTTPError as err:
        outcome = f"transport {type(err).__name__}"
    if isinstance(outcome, tuple):
        outcome, message = outcome
        outcomes.messages[re.sub(r"\d+", "N", message)[:140]] += 1
    if outcome == "completed":
        outcomes.completed += 1
        outcomes.latencies_s.append(time.monotonic() - started)
    elif outcome == "cancelled":
        outcomes.cancelled += 1
    elif outcome == "lost":
        outcomes.lost += 1
    else:
        outcomes.errors[outcome] += 1


async def _stream(client: httpx.AsyncClient, body: dict, leave_after: int | None
                  ) -> str | tuple[str, str]:
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            error = json.loads(await response.aread() or b"{}").get("error", {})
            return (f"{response.status_code} {error.get('code', '')}".strip(),
                    error.get("message", ""))
        num_events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "incomplete stream"
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                return (f"mid-stream {error.get('code') or error.get('type')}",
                        error.get("message", ""))
            num_events += 1
            if leave_after is not None and num_events > leave_after:
                return "cancelled"  # leaving the block closes the connection mid-stream
            if event["choices"] and event["choices"][0].get("finish_reason"):
                return "completed"
    return "incomplete stream"


async def run_load(serve: Serve, args: argparse.Namespace, outcomes: Outcomes,
                   kills: list[dict]) -> float:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.concurrency + 8,
                          max_keepalive_connections=args.concurrency + 8)
    kill_at = [args.num_requests * (k + 1) // (args.num_kills + 1) for k in range(args.num_kills)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(args.num_requests):
        queue.put_nowait(index)
    num_done = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal num_done
        while not queue.empty():
            index = queue.get_nowait()
            cancel = rng.random() < args.cancel_fraction
            await one_request(client, index, random.Random(rng.random()), cancel,
                              args.request_timeout_s, outcomes)
            num_done += 1

    async def killer() -> None:
        """Each kill once its share of requests is done and every worker is back (the previous
        victim restarted), so that a migration target exists."""
        for at in kill_at:
            while num_done < at:
                await asyncio.sleep(0.2)
            await asyncio.to_thread(wait_for_workers, serve, 1 + args.num_decode, 600)
            kills.append(kill_decode_worker(serve, len(kills), args.num_decode))

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=serve.url, limits=limits,
                                 timeout=httpx.Timeout(args.request_timeout_s)) as client:
        await asyncio.gather(killer(), *(client_loop(client) for _ in range(args.concurrency)))
    return time.monotonic() - started


def kill_decode_worker(serve: Serve, num_kills: int, num_decode: int) -> dict:
    worker_id = f"decode-{num_kills % num_decode}"
    pid = serve.worker_pids().get(worker_id)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    print(f"killed {worker_id} (pid {pid})", flush=True)
    return {"worker": worker_id, "pid": pid, "at_s": time.monotonic()}


def held(serve: Serve) -> dict[str, float]:
    m = serve.metrics()
    return {"pinned_requests": sum(v for k, v in m.items()
                                   if k.startswith("tandem_kv_pinned_requests")),
            "kv_usage_sum": sum(v for k, v in m.items()
                                if k.startswith("vllm:kv_cache_usage_perc")),
            "running": sum(v for k, v in m.items() if k.startswith("vllm:num_requests_running"))}


def wait_for_workers(serve: Serve, num_workers: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{serve.url}/health", timeout=10).status_code == 200 and \
                    sum(1 for k in serve.metrics()
                        if k.startswith("vllm:num_requests_running")) >= num_workers:
                return
        except httpx.HTTPError:
            pass  # a frontend busy with the load answers late; ask again
        time.sleep(0.5)


def main() -> int:
    args = parse_args()
    serve = Serve(args)
    serve.wait_ready()
    num_workers = 1 + args.num_decode
    outcomes, kills = Outcomes(), []
    try:
        rss_before = rss_of(serve)
        elapsed_s = asyncio.run(run_load(serve, args, outcomes, kills))
        wait_for_workers(serve, num_workers, 120)
        time.sleep(1.5)  # two heartbeats: the workers' stats are fresh
        held_at_end = held(serve)
        time.sleep(args.kv_lease_s + 1.5)
        held_after_lease = held(serve)
        rss_after = rss_of(serve)
        metrics = serve.metrics()
    finally:
        exit_code = serve.stop()
    restarts = [line.strip() for line in serve.lines if "restarting it in" in line]
    silences_s = [float(m.group(1)) for line in serve.lines
                  if (m := re.search(r"heartbeat again after ([\d.]+) s", line))]
    summary = {
        "num_requests": args.num_requests, "concurrency": args.concurrency,
        "cancel_fraction": args.cancel_fraction, "num_decode": args.num_decode,
        "elapsed_s": round(elapsed_s, 1),
        "requests_per_s": round(args.num_requests / elapsed_s, 1),
        "completed": outcomes.completed, "cancelled": outcomes.cancelled,
        "lost": outcomes.lost, "errors": dict(outcomes.errors),
        "error_messages": dict(outcomes.messages.most_common(8)),
        "num_5xx": sum(n for k, n in outcomes.errors.items()
                       if (k[:1] == "5" or k.startswith("mid-stream")) and "overloaded" not in k),
        "overload_refusals": sum(n for k, n in outcomes.errors.items() if "overloaded" in k),
        "latency_p50_s": percentile(outcomes.latencies_s, 50),
        "latency_p99_s": percentile(outcomes.latencies_s, 99),
        "latency_max_s": round(max(outcomes.latencies_s, default=0.0), 2),
        "held_at_end": held_at_end, "held_after_lease": held_after_lease,
        "rss_mib_before": rss_before, "rss_mib_after": rss_after,
        "migrations": {k: v for k, v in metrics.items() if "migrations" in k},
        "kills": [k["worker"] for k in kills], "restarts_logged": restarts,
        "suspect_episodes": sum("routing new requests elsewhere" in line for line in serve.lines),
        "longest_silence_recovered_s": max(silences_s, default=0.0),
        "declared_dead_for_silence": sum("declaring it dead" in line for line in serve.lines),
        "serve_exit_code": exit_code,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if outcomes.lost == 0 and held_after_lease["pinned_requests"] == 0 else 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))], 2)


if __name__ == "__main__":
    sys.exit(main())
