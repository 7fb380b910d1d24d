"""Where a decode step spends its GPU time, kernel by kernel, at the batches and contexts asked.

  python benchmarks/profile_decode.py [--model random:qwen3-0.6b] [--shapes 1x1024,32x1024,32x4096]

For each shape (batch x context tokens a sequence) it fills the engine's captured decode graph of
that batch (`engine_bench.fill_decode`: distinct blocks, nothing written to the cache), times its
replay (the step as serving runs it), and sums the GPU time of every kernel over a few replays
under torch.profiler, per kernel and per kind, next to the step's limit: the weights and the KV
it reads over the measured copy rate.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_bench import fill_decode, kv_bytes, weight_bytes
from benchmarks.hardware import copy_rate_gbs, median_us
from tandem import LLM

KINDS = (("attention", ("decode", "attn", "merge", "piece")), ("norm", ("rms",)),
         ("q/k/v prep", ("qkv_prep", "rotary", "store")), ("activation", ("silu",)),
         ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "sm90", "splitk")))
REPLAYS = 5
TOP = 12


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other (copies, sampling)"


def kernel_times(replay) -> dict[str, tuple[float, float]]:
    """name -> (GPU microseconds a step, launches a step) over REPLAYS replays."""
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            replay()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per[event.name][0] += event.device_time / REPLAYS
            per[event.name][1] += 1 / REPLAYS
    return {name: (us, n) for name, (us, n) in per.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:qwen3-0.6b")
    parser.add_argument("--shapes", default="1x1024,32x1024,64x1024,32x4096",
                        help="batch x context tokens a sequence, comma-separated")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    hbm = copy_rate_gbs()
    llm = LLM(model=args.model, max_model_len=max(c for _, c in shapes) + 64)
    engine, graphs = llm.engine, llm.engine.runner.graphs
    weights = weight_bytes(llm)
    print(f"{args.model}: weights {weights / 1e9:.2f} GB, copy rate {hbm:.0f} GB/s")
    for batch, context in shapes:
        if batch not in graphs.graphs or not fill_decode(graphs, batch, context,
                                                         engine.config.block_size,
                                                         engine.num_blocks):
            print(f"batch {batch} x {context}: no graph of that batch or too few blocks")
            continue
        replay = graphs.graphs[batch].replay
        step_us = median_us(replay)
        limit_us = (weights + kv_bytes(llm, context) * batch) / hbm / 1e3
        times = kernel_times(replay)
        total = sum(us for us, _ in times.values())
        print(f"\nbatch {batch} x {context}: step {step_us:.0f} us, limit {limit_us:.0f} us "
              f"({step_us / limit_us:.2f}x), kernels {total:.0f} us")
        per_kind: dict[str, float] = defaultdict(float)
        for name, (us, _) in times.items():
            per_kind[kind_of(name)] += us
        for kind, us in sorted(per_kind.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:28s} {us:8.1f} us  {us / total:5.1%}")
        for name, (us, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:TOP]:
            print(f"    {us:8.1f} us {n:5.1f} launches  {name[:90]}")


if __name__ == "__main__":
    main()
