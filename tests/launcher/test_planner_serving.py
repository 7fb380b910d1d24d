"""The planner on, through real processes on a CPU: a load swing makes it add, flip and remove
workers while every request completes and no KV block leaks.

The pools are sized from a synthetic profile written here (3 ms per prompt token, 10 ms plus
23.4 ms per sequence per decode step), so the decisions do not depend on this machine's speed,
and the load stays light enough for a shared 2-core machine:

- phase A, 1 req/s of 400-token prompts and 4-token outputs: prefill needs 2 workers, decode 1,
  so a prefill worker is added;
- phase B, 1 req/s of short prompts and 64-token outputs: prefill needs 1, decode 2, so a prefill
  worker flips to decode, in its own process, in seconds;
- phase C, no traffic: after the hold period the decode pool shrinks back to 1, by draining and
  stopping a worker.

The SLO is loose next to what the CPU shows (TTFT 5 s, ITL 2 s), so only the load drives it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time

import grpc
import httpx

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.planner.sim_synthetic import LinearSteps, synthetic_profile
from tests.serving_harness import Server, free_port, registered_workers

# The deployment's internal secret, given by the operator (here) so this test can call workers.
SECRET = "planner-serving-test-secret-0123456789"
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def start(tmp_path, *args: str) -> Server:
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(synthetic_profile(LinearSteps(), num_kv_blocks=256,
                                                    max_model_len=1024)))
    config = tmp_path / "serve.yaml"
    # The mode is set here too: a --planner flag would replace this whole YAML section.
    # A worker loading its model on a busy 2-core machine can miss heartbeats for seconds.
    config.write_text("planner: {mode: 'on', hold_s: 4, cooldown_s: 2, max_prefill: 2,\n"
                      "          max_decode: 2, ready_timeout_s: 90}\n"
                      "frontend: {dead_after_s: 30}\n")
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "tandem.launcher.cli", "--log-level", "INFO", "serve",
               "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--config",
               str(config), "--planner-profile", str(profile), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                              "TANDEM_INTERNAL_SECRET": SECRET})
    server = Server(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    threading.Thread(target=lambda: server.lines.extend(process.stdout), daemon=True).start()
    wait_for(server, r"^tandem ready", 120)
    return server


def wait_for(server: Server, pattern: str, timeout_s: float, stop: threading.Event | None = None
             ) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in list(server.lines):
            match = re.search(pattern, line)
            if match:
                return match
        assert server.process.poll() is None, "".join(server.lines[-40:])
        time.sleep(0.1)
    raise AssertionError(f"no line matching {pattern!r} in {timeout_s} s:\n"
                         + "".join(server.lines[-60:]))


class Load:
    """Requests at a steady rate in a thread of its own, until told to change or stop."""

    def __init__(self, url: str):
        self.url = url
        self.shape: tuple[float, int, int] | None = None   # (req/s, prompt words, max tokens)
        self.results: list[tuple[int, int, int]] = []     # (status, completion tokens, wanted)
        self.done = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        tasks, n = set(), 0
        async with httpx.AsyncClient(timeout=120) as client:
            while not self.done.is_set():
                if self.shape is None:
                    await asyncio.sleep(0.05)
                    continue
                rate, num_words, max_tokens = self.shape
                n += 1
                prompt = " ".join(WORDS[(n * 7 + i * 3) % len(WORDS)] + str(n)
                                  for i in range(num_words))
                task = asyncio.create_task(self._one(client, prompt, max_tokens))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(1.0 / rate)
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, prompt: str, max_tokens: int) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        try:
            reply = await client.post(self.url + "/v1/completions", json=body)
            tokens = reply.json()["usage"]["completion_tokens"] if reply.status_code == 200 else 0
            self.results.append((reply.status_code, tokens, max_tokens))
            if reply.status_code != 200:
                print(f"{time.strftime('%H:%M:%S')} request failed: {reply.text[:200]}")
        except httpx.HTTPError as err:
            self.results.append((-1, 0, max_tokens))
            print("request failed:", err)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=120)


def worker_pids_by_id(server: Server) -> dict[str, int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server.process.pid)],
                         capture_output=True, text=True).stdout
    pids = {}
    for pid in map(int, re.findall(r"\d+", out)):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except FileNotFoundError:
            continue
        if b"TANDEM_WORKER_SPEC" in environ:
            pids[json.loads(environ[b"TANDEM_WORKER_SPEC"])["worker_id"]] = pid
    return pids


def worker_addresses(server: Server) -> dict[str, str]:
    """Each live worker's address, by worker id."""
    return {worker_id: address for worker_id, (_, address) in registered_workers(server).items()}


def stats(address: str) -> wpb.WorkerStats:
    with grpc.insecure_channel(address) as channel:
        return wgrpc.WorkerStub(channel).GetStats(
            wpb.StatsRequest(), timeout=10, metadata=(("tandem-internal-secret", SECRET),))


def test_load_swing_adds_flips_and_removes_workers(tmp_path):
    server = start(tmp_path, "--device", "cpu", "--model", "random:tiny", "--num-prefill", "1",
                   "--num-decode", "1", "--num-kv-blocks", "256", "--max-model-len", "1024",
                   "--remote-prefill-min-tokens", "64", "--slo", "ttft_ms=5000",
                   "itl_ms=2000", "--gpu-budget", "3", "--planner-interval-s", "1")
    load = Load(server.http_url)
    try:
        load.shape = (1.0, 130, 4)            # phase A: long prompts, short outputs
        added = wait_for(server, r"planner: started prefill worker (\S+)", 30)[1]
        wait_for(server, rf"worker {added} registered: prefill", 120)
        pids = worker_pids_by_id(server)
        load.shape = (1.0, 5, 64)             # phase B: short prompts, long outputs
        flip = wait_for(server, r"planner: flipped worker (\S+) from prefill to decode in "
                                r"([\d.]+) s \(drain ([\d.]+) s, switch ([\d.]+) s\), same "
                                r"process pid (\d+)", 40)
        # Phase B's requests are served after the flip too (it can come within a second).
        deadline = time.monotonic() + 30
        while sum(r[2] == 64 for r in load.results) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        load.shape = None                     # phase C: idle
        removed = wait_for(server, r"planner: removed worker (\S+)", 40)[1]
        load.stop()
        assert pids[flip[1]] == int(flip[5]), "the flip must keep the worker's process"
        assert float(flip[2]) < 10.0, f"flip took {flip[2]} s"
        print(f"flip of {flip[1]}: {flip[2]} s (drain {flip[3]} s, switch {flip[4]} s); "
              f"added {added}, removed {removed}")
        assert sum(r[2] == 4 for r in load.results) >= 3     # phase A's
        assert sum(r[2] == 64 for r in load.results) >= 3    # phase B's
        failed = [r for r in load.results if r[0] != 200 or r[1] != r[2]]
        assert not failed, f"{len(failed)} of {len(load.results)} requests failed: {failed[:5]}"
        addresses = worker_addresses(server)
        assert removed not in addresses and len(addresses) == 2
        for worker_id, address in addresses.items():
            s = stats(address)
            assert (s.num_running, s.num_waiting, s.num_pinned_requests) == (0, 0, 0), worker_id
            assert s.num_free_blocks == s.num_blocks == 256, (worker_id, s)
        assert server.metric("tandem_planner_actions_total", action="flip") >= 1
        assert server.metric("tandem_planner_flip_seconds", phase="total") > 0
    finally:
        load.stop()
        assert server.stop() == 0
