"""Faults through real processes: workers killed (SIGKILL) or stopped (SIGSTOP) mid-request, NIXL
pulls that fail, clients that leave at random moments. Every request must end within its deadline
(completed, migrated, or a clear error) and afterwards no worker may hold a pinned or used block.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import replace

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.launcher.deploy import LocalDeployment
from tandem.worker.config import WorkerOptions
from tests.serving_harness import Server, start_server, worker_pid, worker_spec

pytest.importorskip("nixl")

PROMPT = "Tell me a long story about a lighthouse keeper and the ships that pass. " * 3
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def client_of(server: Server, timeout_s: float = 60.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0,
                         timeout=timeout_s)


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


def workers_of(server: Server) -> dict[str, str]:
    """Registered workers (id -> role), as the frontend's metrics list them."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=5).text
    found = {}
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            labels = dict(part.split("=") for part in line[line.index("{") + 1:
                                                           line.index("}")].split(","))
            found[labels["worker"].strip('"')] = labels["role"].strip('"')
    return found


def nothing_held(server: Server) -> bool:
    """No pinned request and no used KV block on any worker (from their latest heartbeats)."""
    return (server.metric("tandem_kv_pinned_requests") == 0
            and server.metric("vllm:kv_cache_usage_perc") == 0
            and server.metric("vllm:num_requests_running") == 0)


class Stream(threading.Thread):
    """One streamed greedy completion in the background: its text, finish reason and error."""

    def __init__(self, server: Server, max_tokens: int, prompt: str = PROMPT):
        super().__init__(daemon=True)
        self.client = client_of(server)
        self.prompt, self.max_tokens = prompt, max_tokens
        self.text, self.finish, self.error = "", None, None
        self.num_chunks = 0
        self.elapsed_s = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            for chunk in self.client.completions.create(
                    model="random:tiny", prompt=self.prompt, max_tokens=self.max_tokens,
                    stream=True, **GREEDY):
                if chunk.choices:
                    self.text += chunk.choices[0].text
                    self.num_chunks += 1
                    self.finish = chunk.choices[0].finish_reason or self.finish
        except Exception as err:  # recorded: the test asserts on it
            self.error = err
        self.elapsed_s = time.monotonic() - started


def decode_workers(server: Server) -> list[str]:
    return [w for w, role in workers_of(server).items() if role == "decode"]


def busiest_decode_worker(server: Server, num_streams: int) -> str:
    """The decode worker running the most of the test's streams, once the workers' heartbeats
    (every 0.5 s) count all of them: a count read before could still be an earlier request's,
    and pick a worker that runs none."""
    wait_until(lambda: sum(server.metric("vllm:num_requests_running", worker=w)
                           for w in decode_workers(server)) >= num_streams, 10,
               "every stream in the decode workers' heartbeats")
    return max(decode_workers(server),
               key=lambda w: server.metric("vllm:num_requests_running", worker=w))


SUSPECT_AFTER_S, DEAD_AFTER_S = 1.0, 10.0


@pytest.fixture(scope="module")
def disaggregated():
    """1 prefill + 2 decode workers, every prompt prefilled remotely, a 3 s lease; a worker late
    with its heartbeats for 1 s is routed nothing new, one silent for 10 s is declared dead
    (shorter than the defaults, so that the stopped-worker tests take seconds)."""
    server = start_server("--num-prefill", "1", "--num-decode", "2", "--device", "cpu",
                          "--num-kv-blocks", "256", "--remote-prefill-min-tokens", "1",
                          "--kv-lease-s", "3", "--worker-suspect-after-s", str(SUSPECT_AFTER_S),
                          "--worker-dead-after-s", str(DEAD_AFTER_S))
    yield server
    assert server.stop() == 0


def test_killed_decode_worker_mid_stream_migrates_and_greedy_output_continues(disaggregated):
    server = disaggregated
    reference = client_of(server).completions.create(model="random:tiny", prompt=PROMPT,
                                                     max_tokens=600, **GREEDY)
    streams = [Stream(server, 600) for _ in range(4)]
    for stream in streams:
        stream.start()
    wait_until(lambda: all(s.num_chunks >= 5 for s in streams), 30, "streams started")
    victim = busiest_decode_worker(server, len(streams))
    os.kill(worker_pid(server, victim), signal.SIGKILL)
    for stream in streams:
        stream.join(timeout=60)
        assert stream.error is None and not stream.is_alive()
        assert stream.finish == "length"
        assert stream.text == reference.choices[0].text  # continued exactly where it broke
    assert server.metric("tandem_request_migrations_total", role="decode") >= 1
    wait_until(lambda: victim in workers_of(server), 90, f"{victim} restarted and registered")
    wait_until(lambda: nothing_held(server), 10, "blocks pinned or used after the kill")
    assert any(f"worker {victim} died (signal 9, SIGKILL); restarting it in 1 s" in line
               for line in server.lines)


def test_a_decode_worker_stopped_for_less_than_the_dead_threshold_keeps_its_streams(
        disaggregated):
    """A slow host, played by SIGSTOP: the late worker gets no new request, but its streams are
    not ended; they finish once it runs again, with no migration and no error."""
    server = disaggregated
    wait_until(lambda: len(decode_workers(server)) == 2, 90, "both decode workers registered")
    prompt = PROMPT + "Pause."
    reference = client_of(server).completions.create(model="random:tiny", prompt=prompt,
                                                     max_tokens=400, **GREEDY)
    streams = [Stream(server, 400, prompt) for _ in range(2)]
    for stream in streams:
        stream.start()
    wait_until(lambda: all(s.num_chunks >= 5 for s in streams), 30, "streams started")
    victim = busiest_decode_worker(server, len(streams))
    migrations = server.metric("tandem_request_migrations_total")
    pid = worker_pid(server, victim)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_until(lambda: server.metric("tandem_worker_suspect", worker=victim) == 1,
                   DEAD_AFTER_S / 2, f"{victim} suspect")
        out = client_of(server, timeout_s=DEAD_AFTER_S).completions.create(
            model="random:tiny", prompt="New. " + PROMPT, max_tokens=4, **GREEDY)
        assert out.usage.completion_tokens == 4  # routed around the late worker
        assert victim in workers_of(server)      # late, not dropped
        assert time.monotonic() - stopped_at < DEAD_AFTER_S  # else this proves nothing
    finally:
        os.kill(pid, signal.SIGCONT)
    for stream in streams:
        stream.join(timeout=60)
        assert stream.error is None and not stream.is_alive()
        assert stream.finish == "length" and stream.text == reference.choices[0].text
    assert server.metric("tandem_request_migrations_total") == migrations
    wait_until(lambda: server.metric("tandem_worker_suspect", worker=victim) == 0, 10,
               f"{victim} heartbeating again")
    wait_until(lambda: nothing_held(server), 10, "blocks pinned or used after SIGCONT")


def test_stopped_decode_worker_mid_stream_migrates_once_declared_dead(disaggregated):
    server = disaggregated
    reference = client_of(server).completions.create(model="random:tiny", prompt=PROMPT + "Go.",
                                                     max_tokens=600, **GREEDY)
    streams = [Stream(server, 600, PROMPT + "Go.") for _ in range(2)]
    for stream in streams:
        stream.start()
    wait_until(lambda: all(s.num_chunks >= 5 for s in streams), 30, "streams started")
    victim = busiest_decode_worker(server, len(streams))
    pid = worker_pid(server, victim)
    os.kill(pid, signal.SIGSTOP)
    try:
        for stream in streams:
            stream.join(timeout=60)
            assert stream.error is None and not stream.is_alive()
            assert stream.text == reference.choices[0].text
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: victim in workers_of(server), 20, f"{victim} registered again")
    wait_until(lambda: nothing_held(server), 10, "blocks pinned or used after SIGCONT")


def test_a_worker_nobody_supervises_is_dropped_as_soon_as_its_process_dies(disaggregated):
    """A worker started outside the launcher (a planner's, another launcher's) has no supervisor
    to see it exit: its broken connection says so, well before its silence would."""
    server = disaggregated
    spec = replace(WorkerOptions.from_json(worker_spec(server, "decode-0")), worker_id="decode-9")
    deployment = LocalDeployment()
    deployment.start_worker(spec)
    try:
        wait_until(lambda: "decode-9" in workers_of(server), 120, "decode-9 registered")
        os.kill(deployment.processes["decode-9"].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: "decode-9" not in workers_of(server), DEAD_AFTER_S, "decode-9 dropped")
        assert time.monotonic() - killed_at < DEAD_AFTER_S / 2
    finally:
        deployment.stop_all(timeout_s=5)
    assert any("dropping decode worker decode-9: its connection broke" in line
               for line in server.lines)


def test_stopped_prefill_worker_costs_a_bounded_wait(disaggregated):
    server = disaggregated
    pid = worker_pid(server, "prefill-0")
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        out = client_of(server).completions.create(model="random:tiny", prompt=PROMPT + "Stop?",
                                                   max_tokens=8, **GREEDY)
        elapsed_s = time.monotonic() - started
        assert out.usage.completion_tokens == 8
        # The registry declares the worker dead 10 s after its last heartbeat (looking twice a
        # second), which ends the call; the decode worker then prefills.
        assert elapsed_s < DEAD_AFTER_S + 6, elapsed_s
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: "prefill-0" in workers_of(server), 10, "prefill-0 registered again")
    wait_until(lambda: nothing_held(server), 10, "blocks pinned or used after SIGCONT")


def test_clients_leaving_at_random_moments_leave_no_block_behind(disaggregated):
    server = disaggregated
    rng = random.Random(7)

    def leave_after(delay_s: float, index: int) -> None:
        body = {"model": "random:tiny", "prompt": f"{index} " + PROMPT, "max_tokens": 64,
                "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{server.http_url}/v1/completions", json=body,
                              timeout=30) as response:
                deadline = time.monotonic() + delay_s
                for _ in response.iter_lines():
                    if time.monotonic() > deadline:
                        break
        except httpx.TimeoutException:
            pass

    threads = [threading.Thread(target=leave_after, args=(rng.uniform(0, 0.6), i))
               for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=40)
    # Releases are immediate; the 3 s lease is the backstop; heartbeats report within 0.5 s.
    wait_until(lambda: nothing_held(server), 8, "blocks pinned or used after the clients left")


def grpc_health(server: Server) -> int:
    with grpc.insecure_channel(server.grpc_address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=5).status


def test_failed_pulls_recompute_and_a_dead_last_decode_worker_is_a_clear_503_then_back():
    server = start_server("--num-prefill", "1", "--num-decode", "1", "--device", "cpu",
                          "--num-kv-blocks", "128", "--remote-prefill-min-tokens", "1",
                          env={"TANDEM_TEST_FAIL_KV_PULLS": "1"})
    try:
        client = client_of(server)
        for i in range(3):
            out = client.completions.create(model="random:tiny", prompt=f"{i} {PROMPT}",
                                            max_tokens=6, **GREEDY)
            assert out.usage.completion_tokens == 6
        assert server.metric("tandem_kv_transfer_fallback_total") == 3
        wait_until(lambda: nothing_held(server), 5, "blocks pinned after failed pulls")
        stream = Stream(server, 2000)
        stream.start()
        wait_until(lambda: stream.num_chunks >= 3, 30, "stream started")
        os.kill(worker_pid(server, "decode-0"), signal.SIGKILL)
        stream.join(timeout=30)
        assert isinstance(stream.error, openai.APIError) and stream.elapsed_s < 30
        assert "no decode worker is left" in str(stream.error)
        # While it restarts, /health and the gRPC health service say so, and why.
        # (the launcher looks at its processes twice a second).
        def health_message() -> str:
            health = httpx.get(f"{server.http_url}/health", timeout=5)
            assert health.status_code == 503
            return health.json()["error"]["message"]

        wait_until(lambda: "decode pool has 0 of 1 workers ready; decode-0 died (signal 9, "
                           "SIGKILL)" in health_message(), 3, "/health names the dead worker")
        assert grpc_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
        wait_until(lambda: httpx.get(f"{server.http_url}/health", timeout=5).status_code == 200,
                   90, "decode-0 restarted")
        # The gRPC health service follows at the launcher's next look (0.5 s).
        wait_until(lambda: grpc_health(server) == health_pb2.HealthCheckResponse.SERVING, 3,
                   "gRPC health SERVING again")
        out = client.completions.create(model="random:tiny", prompt=PROMPT, max_tokens=6,
                                        **GREEDY)
        assert out.usage.completion_tokens == 6
        wait_until(lambda: nothing_held(server), 5, "blocks pinned after the restart")
    finally:
        server.stop()
