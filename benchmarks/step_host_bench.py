"""Host time against device time of the steps that are not decode-only, on one NVIDIA GPU.

    python benchmarks/step_host_bench.py [--model random:llama-3.1-8b] [--shapes 2048x48,...]
        [--context 1024] [--cached 0] [--cprofile 15]

For prompt chunks of 16-2048 tokens, alone and beside 8 or 32 decoding sequences (--context tokens
each; --shapes CHUNKxDECODES,... for others; --cached tokens before each chunk), one row per
shape: the engine step's wall time (median of 5, after one), the time `runner.launch` takes to
return (the host's share: input preparation, launches, sampling), and the sum of the
step's device kernel times from torch.profiler, with their count. A step whose launch time is near
its wall time and far above its kernel time is bound by the host. `--cprofile N` prints, per shape,
the N functions the launches spent most of their own time in (cProfile over its timed steps).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
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
    parser.add_argument("--shapes", default=None,
                        help="CHUNKxDECODES,... (default: " + ",".join(f"{c}x{d}" for c, d in SHAPES)
                        + ")")
    parser.add_argument("--context", type=int, default=1024, help="each decode's context tokens")
    parser.add_argument("--cached", type=int, default=0, help="tokens cached before each chunk")
    parser.add_argument("--cprofile", type=int, default=0,
                        help="print the launches' N costliest functions per shape")
    args = parser.parse_args()
    shapes = SHAPES if args.shapes is None else [
        tuple(int(x) for x in item.split("x")) for item in args.shapes.split(",")]
    max_len = max(4096, args.context + 64, args.cached + max(c for c, _ in shapes) + 64)
    llm = LLM(model=args.model, max_model_len=max_len, max_num_batched_tokens=2048 + 64)
    runner = llm.engine.runner
    probe = StepProbe(llm.engine)
    probe.warm_up(256)
    launch_s: list[float] = []
    launch = runner.launch

    profiler = cProfile.Profile()

    def timed_launch(batch):
        start = time.perf_counter()
        if args.cprofile:   # its cost per Python call would be in every figure otherwise
            profiler.enable()
        pending = launch(batch)
        if args.cprofile:
            profiler.disable()
        launch_s.append(time.perf_counter() - start)
        return pending

    runner.launch = timed_launch
    print("model | chunk + decodes | step ms | launch ms | kernel ms | kernels")
    for chunk, num_decodes in shapes:
        decodes = probe.place_decodes(num_decodes, args.context) if num_decodes else []

        def step() -> float:
            if decodes:
                return probe.mixed_once(chunk, args.cached, decodes)[0]
            return probe.prefill_once(chunk, args.cached)

        step()
        launch_s.clear()
        profiler = cProfile.Profile()   # the five timed steps' launches only
        wall = [step() for _ in range(5)]
        host = statistics.median(launch_s)
        text = io.StringIO()   # before the profiled step below adds its launch
        if args.cprofile:
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.cprofile)
        device_ms, count = kernel_ms(step)
        probe.clear()
        print(f"{args.model} | {chunk} + {num_decodes} | {statistics.median(wall) * 1e3:.2f} | "
              f"{host * 1e3:.2f} | {device_ms:.2f} | {count}", flush=True)
        if args.cprofile:
            print(text.getvalue().split("\n\n", 1)[-1], flush=True)


if __name__ == "__main__":
    main()
