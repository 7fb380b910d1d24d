"""Where a batch-1 decode step of random:llama-3.1-8b spends its GPU time.

  python benchmarks/profile_decode.py

Runs decode steps at 1k context under torch.profiler (eager, so every kernel is its own record),
sums the GPU time of each kernel kind per step, and sets the total beside the replayed CUDA graph of
the same step and the HBM roofline (weight bytes / measured copy rate).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.hardware import copy_rate_gbs, median_us
from tandem import LLM, SamplingParams

KINDS = (("attention", ("decode", "attn")), ("norm", ("rms",)), ("rotary", ("rotary",)),
         ("kv store", ("store",)), ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "sm90")))
STEPS = 8


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other (elementwise, copies, sampling)"


def main() -> None:
    hbm = copy_rate_gbs()
    llm = LLM(model="random:llama-3.1-8b", max_model_len=8192, num_kv_blocks=2048,
              enforce_eager=True)
    engine = llm.engine
    prompt = list(range(100, 1124))
    engine.add_request("p", prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for _ in range(4):
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            engine.step()
    per_kind: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kind[kind_of(event.key)] += event.device_time_total / STEPS
    weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    llm_graph = LLM(model="random:llama-3.1-8b", max_model_len=8192, num_kv_blocks=2048)
    graphs = llm_graph.engine.runner.graphs
    graphs.seq_lens[:1].fill_(1024)
    graphs.slot_mapping[:1].fill_(-1)
    graphs.block_tables[0, :64] = torch.arange(64, device="cuda")
    step_us = median_us(graphs.graphs[1].replay)
    print(f"HBM copy rate {hbm:.0f} GB/s; weights {weights / 1e9:.2f} GB; "
          f"roofline {weights / hbm / 1e3:.0f} us per step")
    total = sum(per_kind.values())
    for kind, us in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:40s} {us:8.0f} us  {us / total:5.1%}")
    matmul = per_kind.get("matmul", 0.0)
    print(f"matmuls read the weights at {weights / matmul / 1e3:.0f} GB/s "
          f"({weights / matmul / 1e3 / hbm:.0%} of the copy rate)")
    print(f"{'kernel time per step (eager)':40s} {total:8.0f} us")
    print(f"{'whole step as a CUDA graph':40s} {step_us:8.0f} us")


if __name__ == "__main__":
    main()
