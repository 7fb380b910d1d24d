"""Disaggregated serving on two GPUs: KV transfer bandwidth and the TTFT split.

  python benchmarks/disagg_bench.py [--model random:llama-3.1-8b] [--lengths 1024,4096,16384]
                                    [--background 0,8]

Starts `tandem serve` with 1 prefill and 1 decode worker (one GPU each) and sends prompts of each
length, one at a time, each new (no prefix cache hit), asking for 2 tokens. Per prompt:

- KV bytes pulled and the pull's duration, from the frontend's tandem_kv_transfer_* metrics;
- the time to first token split into prefill (the prefill worker's own time), transfer, and the
  decode worker's first step (the gap between the first and second token, less the transfer).

Each `--background` level is a number of other requests kept decoding on the decode worker while
the prompts are measured (0: an idle server; a loaded server is what serving looks like). Their
prompts are shorter than --remote-prefill-min-tokens, so they are prefilled locally and move no
KV that could be mistaken for the measured pulls.

Baselines, from the same run, on idle GPUs once the server has stopped: torch's peer copy from
GPU 0 to GPU 1 of the same bytes, (a) back to back, the hardware's best, and (b) each copy after a
pause as long as the prompt's prefill: a pull starts after exactly such a pause, and GPUs and CPUs
that sat idle in it take a while to come back up to speed (clocks, caches). With background load,
also the peer copy made from this process while the load runs (see `loaded_copy_gbps`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc


# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from tests.serving_harness import start_server


BACKGROUND_PROMPT_TOKENS = 64
BACKGROUND_MAX_TOKENS = 4000


def peer_copy_s(num_bytes: int, idle_s: float = 0.0, repeats: int = 10) -> float:
    """Median seconds of one torch copy cuda:0 -> cuda:1, each after `idle_s` of idle GPUs."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):
        dst.copy_(src)
    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        if idle_s:
            time.sleep(idle_s)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize("cuda:1")
        torch.cuda.synchronize("cuda:0")
        runs.append(time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return statistics.median(runs)


def generate_request(prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingOptions(
        max_tokens=max_tokens, temperature=0, ignore_eos=True))


def stream_two_tokens(address: str, prompt: list[int]) -> tuple[float, float]:
    """Seconds to the first and to the second streamed token, over the gRPC API (token ids: the
    random models' tokens mostly have no text)."""
    times = []
    with grpc.insecure_channel(address) as channel:
        start = time.perf_counter()
        for response in pbgrpc.GenerationStub(channel).Generate(generate_request(prompt, 2),
                                                               timeout=120):
            times.extend([time.perf_counter() - start] * len(response.token_ids))
    if len(times) < 2:
        raise RuntimeError(f"expected 2 streamed tokens, got {len(times)}")
    return times[0], times[1]


class BackgroundLoad:
    """`num_streams` long generations kept running (each restarted when it ends) until stopped."""

    def __init__(self, address: str, num_streams: int, seed: int) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pbgrpc.GenerationStub(self.channel)
        self.stopping = threading.Event()
        self.calls: list = []
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(num_streams)]
        self.tokens = 0

    def __enter__(self) -> BackgroundLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        with self.lock:
            for call in self.calls:
                call.cancel()
        for thread in self.threads:
            thread.join(timeout=30)
        self.channel.close()

    def _run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                prompt = [self.rng.randrange(16, 2000) for _ in range(BACKGROUND_PROMPT_TOKENS)]
                call = self.stub.Generate(generate_request(prompt, BACKGROUND_MAX_TOKENS))
                self.calls.append(call)
            try:
                for response in call:
                    self.tokens += len(response.token_ids)
            except grpc.RpcError:
                if not self.stopping.is_set():
                    raise
            with self.lock:
                self.calls.remove(call)


def measure(server, lengths: list[int], repeats: int, rng: random.Random) -> list[tuple]:
    """(length, bytes moved, transfer s, prefill s, first token s, second token s) per prompt."""
    rows = []
    for length in lengths:
        for attempt in range(repeats + 1):
            prompt = [rng.randrange(16, 2000) for _ in range(length)]
            names = ("tandem_kv_transfer_bytes_total", "tandem_kv_transfer_seconds_sum",
                     "tandem_prefill_seconds_sum")
            before = {name: server.metric(name) for name in names}
            first_s, second_s = stream_two_tokens(server.grpc_address, prompt)
            moved, transfer_s, prefill_s = (server.metric(name) - before[name] for name in names)
            if attempt:  # the first of each length compiles kernels for its shapes
                rows.append((length, moved, transfer_s, prefill_s, first_s, second_s))
    return rows


def loaded_copy_gbps(rows: list[tuple]) -> dict[int, float]:
    """Back-to-back peer-copy GB/s of each length's bytes, from this (third) process while the
    background requests decode on GPU 1. GPU 1 then time-slices between this process's context and
    the decode worker's, which a pull (issued from the decode worker's own context) does not: a
    reference for what the load does to a copy, not a limit for the pull."""
    return {length: moved / peer_copy_s(moved) / 1e9
            for length, moved in sorted({(r[0], int(r[1])) for r in rows})}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--background", default="0,8",
                        help="comma-separated numbers of requests decoding meanwhile")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    levels = [int(n) for n in args.background.split(",")]
    server = start_server("--model", args.model, "--num-prefill", "1", "--num-decode", "1",
                          "--device", "cuda", "--remote-prefill-min-tokens",
                          str(BACKGROUND_PROMPT_TOKENS + 1),
                          "--max-model-len", str(max(lengths) + BACKGROUND_MAX_TOKENS + 64),
                          "--max-num-batched-tokens", "16384", "--num-kv-blocks", "8192",
                          timeout_s=540)
    results: dict[int, list[tuple]] = {}
    rates: dict[int, float] = {}  # background tokens/s while measuring
    loaded_copies: dict[int, dict[int, float]] = {}  # level -> length -> copy GB/s under load
    rng = random.Random(0)
    try:
        stream_two_tokens(server.grpc_address, [rng.randrange(16, 2000) for _ in range(128)])
        for level in levels:
            with BackgroundLoad(server.grpc_address, level, seed=level) as load:
                time.sleep(2.0 if level else 0.0)  # let the background requests start decoding
                tokens_before, start = load.tokens, time.perf_counter()
                results[level] = measure(server, lengths, args.repeats, rng)
                rates[level] = (load.tokens - tokens_before) / (time.perf_counter() - start)
                if level:
                    loaded_copies[level] = loaded_copy_gbps(results[level])
    except Exception:
        print("".join(server.lines[-40:]))
        raise
    finally:
        server.stop()
    for level in levels:
        print(f"background {level}: {rates[level]:.0f} tokens/s decoded meanwhile")
    print("background | tokens | MiB | transfer ms | NIXL GB/s | peer copy GB/s (back to back) "
          "| of it | peer copy GB/s (after a pause) | of it | peer copy GB/s (another process, "
          "same load) | TTFT ms | prefill ms | transfer ms | first decode step ms")
    for level in levels:
        for length in lengths:
            mine = [r for r in results[level] if r[0] == length]
            moved = int(mine[0][1])
            transfer = statistics.median(r[2] for r in mine)
            prefill = statistics.median(r[3] for r in mine)
            first = statistics.median(r[4] for r in mine)
            step = statistics.median(r[5] - r[4] - r[2] for r in mine)
            nixl = moved / transfer / 1e9
            hot = moved / peer_copy_s(moved) / 1e9
            idle = moved / peer_copy_s(moved, idle_s=prefill, repeats=5) / 1e9
            loaded = loaded_copies.get(level, {}).get(length)
            loaded_text = "-" if loaded is None else f"{loaded:.0f}"
            print(f"{level} | {length} | {moved / 2**20:.0f} | {transfer * 1e3:.2f} | {nixl:.0f} "
                  f"| {hot:.0f} | {nixl / hot:.0%} | {idle:.0f} | {nixl / idle:.0%} "
                  f"| {loaded_text} | {first * 1e3:.1f} | {prefill * 1e3:.1f} "
                  f"| {transfer * 1e3:.2f} | {step * 1e3:.1f}")


if __name__ == "__main__":
    main()
