"""Disaggregated serving on two GPUs: KV transfer bandwidth and the TTFT split.

  python benchmarks/disagg_bench.py [--model random:llama-3.1-8b] [--lengths 1024,4096,16384]

Starts `tandem serve` with 1 prefill and 1 decode worker (one GPU each) and sends prompts of each
length, one at a time, each new (no prefix cache hit), asking for 2 tokens. Per prompt:

- KV bytes pulled and the pull's duration, from the frontend's tandem_kv_transfer_* metrics, next
  to torch's peer-copy bandwidth from GPU 0 to GPU 1 for the same bytes, measured in the same run;
- the time to first token split into prefill (the prefill worker's own time), transfer, and the
  decode worker's first step (the gap between the first and second token, less the transfer).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import grpc
import torch

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc


# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from tests.serving_harness import start_server


def peer_copy_gbs(num_bytes: int) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    runs = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize("cuda:1")
        torch.cuda.synchronize("cuda:0")
        runs.append(time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return num_bytes / sorted(runs)[len(runs) // 2] / 1e9


def stream_two_tokens(address: str, prompt: list[int]) -> tuple[float, float]:
    """Seconds to the first and to the second streamed token, over the gRPC API (token ids: the
    random models' tokens mostly have no text)."""
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingOptions(
        max_tokens=2, temperature=0, ignore_eos=True))
    times = []
    with grpc.insecure_channel(address) as channel:
        start = time.perf_counter()
        for response in pbgrpc.GenerationStub(channel).Generate(request, timeout=120):
            times.extend([time.perf_counter() - start] * len(response.token_ids))
    if len(times) < 2:
        raise RuntimeError(f"expected 2 streamed tokens, got {len(times)}")
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    server = start_server("--model", args.model, "--num-prefill", "1", "--num-decode", "1",
                          "--device", "cuda", "--remote-prefill-min-tokens", "1",
                          "--max-model-len", str(max(lengths) + 64),
                          "--max-num-batched-tokens", "16384", "--num-kv-blocks", "4096",
                          timeout_s=540)
    rows = []
    rng = random.Random(0)
    try:
        stream_two_tokens(server.grpc_address, [rng.randrange(16, 2000) for _ in range(64)])  # warm-up
        for length in lengths:
            for attempt in range(args.repeats + 1):
                prompt = [rng.randrange(16, 2000) for _ in range(length)]
                before = {name: server.metric(name) for name in (
                    "tandem_kv_transfer_bytes_total", "tandem_kv_transfer_seconds_sum",
                    "tandem_prefill_seconds_sum")}
                first_s, second_s = stream_two_tokens(server.grpc_address, prompt)
                moved = server.metric("tandem_kv_transfer_bytes_total") - before[
                    "tandem_kv_transfer_bytes_total"]
                transfer_s = server.metric("tandem_kv_transfer_seconds_sum") - before[
                    "tandem_kv_transfer_seconds_sum"]
                prefill_s = server.metric("tandem_prefill_seconds_sum") - before[
                    "tandem_prefill_seconds_sum"]
                if attempt:  # the first of each length compiles kernels for its shapes
                    rows.append((length, moved, transfer_s, prefill_s, first_s, second_s))
    except Exception:
        print("".join(server.lines[-40:]))
        raise
    finally:
        server.stop()
    print("tokens | MiB | transfer ms | NIXL GB/s | peer copy GB/s | of peer | TTFT to prefill "
          "token ms | prefill ms | transfer ms | first decode step ms")
    for length in lengths:
        mine = [r for r in rows if r[0] == length]
        moved = mine[0][1]
        transfer = sorted(r[2] for r in mine)[len(mine) // 2]
        peer = peer_copy_gbs(int(moved))
        nixl = moved / transfer / 1e9
        first = sorted(r[4] for r in mine)[len(mine) // 2]
        prefill = sorted(r[3] for r in mine)[len(mine) // 2]
        step = sorted(r[5] - r[4] - r[2] for r in mine)[len(mine) // 2]
        print(f"{length} | {moved / 2**20:.0f} | {transfer * 1e3:.1f} | {nixl:.0f} | {peer:.0f} | "
              f"{nixl / peer:.0%} | {first * 1e3:.1f} | {prefill * 1e3:.1f} | "
              f"{transfer * 1e3:.1f} | {step * 1e3:.1f}")


if __name__ == "__main__":
    main()
