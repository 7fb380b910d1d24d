"""Role flip time on a CPU, drain included, and what clients saw during it; a cold start beside it.

Starts `tandem serve` (random:tiny, 1 prefill + 1 decode, planner on) with a synthetic profile on
which the load below needs 2 prefill + 1 decode workers, then 1 prefill + 2 decode:

1. long prompts (400 tokens), 4-token outputs, until the planner has added a prefill worker and it
   is ready (its cold start: process, weights, KV cache, NIXL agent, registration);
2. short prompts, 64-token outputs: the planner flips a prefill worker to decode in place.

Prints the flip (total as the planner saw it, the worker's drain and switch), the cold start of the
added worker, and the latencies of phase 2's requests sent before, during and after the flip's
window, with the number of failed requests.

    python benchmarks/planner_flip_bench.py [--rate 1.0] [--seconds-after 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from tandem.planner.sim_synthetic import LinearSteps, synthetic_profile

FLIP = re.compile(r"(\d\d:\d\d:\d\d,\d+) INFO tandem.launcher.planner_loop: planner: flipped worker "
                  r"(\S+) from (\w+) to (\w+) in ([\d.]+) s \(drain ([\d.]+) s, switch ([\d.]+) s\)")


def start_server(workdir: str, port: int) -> tuple[subprocess.Popen, list[str]]:
    profile, config = os.path.join(workdir, "profile.json"), os.path.join(workdir, "serve.yaml")
    with open(profile, "w") as f:
        json.dump(synthetic_profile(LinearSteps(), num_kv_blocks=256, max_model_len=1024), f)
    with open(config, "w") as f:
        f.write("planner: {mode: 'on', hold_s: 30, cooldown_s: 2, max_prefill: 2, max_decode: 2,"
                " ready_timeout_s: 120}\nfrontend: {dead_after_s: 30}\n")
    command = [sys.executable, "-m", "tandem.launcher.cli", "--log-level", "INFO", "serve",
               "--config", config, "--planner-profile", profile, "--device", "cpu",
               "--model", "random:tiny", "--num-prefill", "1", "--num-decode", "1",
               "--num-kv-blocks", "256", "--max-model-len", "1024",
               "--remote-prefill-min-tokens", "64", "--slo", "ttft_ms=5000", "itl_ms=2000",
               "--gpu-budget", "3", "--planner-interval-s", "1", "--http-port", str(port),
               "--grpc-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return process, lines


def wait_for(lines: list[str], pattern: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in list(lines):
            match = re.search(pattern, line)
            if match:
                return match
        time.sleep(0.1)
    raise SystemExit(f"no {pattern!r} within {timeout_s} s")


class Clients:
    """Steady-rate requests; each record is (sent wall time, e2e s or None on failure)."""

    def __init__(self, url: str, rate: float):
        self.url, self.rate = url, rate
        self.shape: tuple[int, int] | None = None
        self.records: list[tuple[float, float | None]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        tasks, n = set(), 0
        async with httpx.AsyncClient(timeout=300) as client:
            while not self.done.is_set():
                if self.shape is None:
                    await asyncio.sleep(0.05)
                    continue
                n += 1
                words, max_tokens = self.shape
                prompt = " ".join(f"w{n}x{i}" for i in range(words))
                task = asyncio.create_task(self._one(client, prompt, max_tokens))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(1.0 / self.rate)
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, prompt: str, max_tokens: int) -> None:
        sent = time.time()
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        try:
            reply = await client.post(self.url + "/v1/completions", json=body)
            ok = reply.status_code == 200
        except httpx.HTTPError:
            ok = False
        self.records.append((sent, time.time() - sent if ok else None))


def describe(name: str, records: list[tuple[float, float | None]]) -> str:
    done = sorted(e for _, e in records if e is not None)
    failed = sum(e is None for _, e in records)
    if not done:
        return f"{name}: {len(records)} requests, {failed} failed"
    p90 = done[min(len(done) - 1, int(0.9 * len(done)))]
    return (f"{name}: {len(records)} requests, {failed} failed, e2e p50 "
            f"{statistics.median(done):.2f} s, p90 {p90:.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s")
    parser.add_argument("--seconds-after", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=18123)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        process, lines = start_server(workdir, args.port)
        try:
            wait_for(lines, r"^tandem ready", 180)
            clients = Clients(f"http://127.0.0.1:{args.port}", args.rate)
            clients.shape = (130, 4)
            added = wait_for(lines, r"(\d\d:\d\d:\d\d,\d+) .*planner: started prefill worker "
                                    r"(\S+)", 60)
            ready = wait_for(lines, rf"(\d\d:\d\d:\d\d,\d+) .*worker {added[2]} registered: "
                                    r"prefill", 300)
            clients.shape = (5, 64)
            phase_b_s = time.time()
            flip = wait_for(lines, FLIP.pattern, 120)
            time.sleep(args.seconds_after)
            clients.done.set()
            clients.thread.join(timeout=300)
        finally:
            process.terminate()
            process.wait(timeout=60)
    flip_end = _wall(flip[1])
    flip_start = flip_end - float(flip[5])
    print(f"cold start of {added[2]} (asked for -> registered): "
          f"{_wall(ready[1]) - _wall(added[1]):.1f} s")
    print(f"flip of {flip[2]} {flip[3]} -> {flip[4]}: {flip[5]} s as the planner saw it "
          f"(drain {flip[6]} s, switch {flip[7]} s)")
    records = clients.records
    print(describe("short prompts sent before the flip",
                   [r for r in records if phase_b_s <= r[0] < flip_start]))
    print(describe("sent during the flip", [r for r in records if flip_start <= r[0] <= flip_end]))
    print(describe("after the flip", [r for r in records if r[0] > flip_end]))
    return 0


def _wall(clock: str) -> float:
    """Today's wall time of a log timestamp (HH:MM:SS,mmm)."""
    hms, ms = clock.split(",")
    day = time.strftime("%Y-%m-%d ")
    return time.mktime(time.strptime(day + hms, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


if __name__ == "__main__":
    sys.exit(main())
