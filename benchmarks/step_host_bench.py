"""Host time against device time of the steps that are not decode-only, on one NVIDIA GPU.

    python benchmarks/step_host_bench.py [--model random:llama-3.1-8b]

For prompt chunks of 16-2048 tokens, alone and beside 8 or 32 decoding sequences (1k context each),
one row per shape: the engine step's wall time (median of 5, after one), the time `runner.launch`
takes to return (the host's share: input preparation, launches, sampling), and the sum of the
step's device kernel times from torch.profiler, with their count. A step whose launch time is near
its wall time and far above its kernel time is bound by the host.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from tandem import LLM
from tandem.planner.profile_points import StepProbe

SHAPES = [(16, 0), (64, 0), (256, 0), (512, 0), (2048, 0), (256, 8), (256, 32), (64, 32)]


def kernel_ms(step) -> tuple[float, int]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return sum(e.device_time for e in events) / 1e3, len(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random:llama-3.1-8b")
    args = parser.parse_args()
    llm = LLM(model=args.model, max_model_len=8192, max_num_batched_tokens=2048 + 64)
    runner = llm.engine.runner
    probe = StepProbe(llm.engine)
    probe.warm_up(256)
    launch_s: list[float] = []
    launch = runner.launch

    def timed_launch(batch):
        start = time.perf_counter()
        pending = launch(batch)
        launch_s.append(time.perf_counter() - start)
        return pending

    runner.launch = timed_launch
    print("model | chunk + decodes | step ms | launch ms | kernel ms | kernels")
    for chunk, num_decodes in SHAPES:
        decodes = probe.place_decodes(num_decodes, 1024) if num_decodes else []

        def step() -> float:
            if decodes:
                return probe.mixed_once(chunk, 0, decodes)[0]
            return probe.prefill_once(chunk, 0)

        launch_s.clear()
        wall = [step() for _ in range(6)][1:]
        host = statistics.median(launch_s[1:])
        device_ms, count = kernel_ms(step)
        probe.clear()
        print(f"{args.model} | {chunk} + {num_decodes} | {statistics.median(wall) * 1e3:.2f} | "
              f"{host * 1e3:.2f} | {device_ms:.2f} | {count}", flush=True)


if __name__ == "__main__":
    main()
