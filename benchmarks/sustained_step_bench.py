"""Step times under sustained load against the short bursts a profile times them in.

`tandem profile` times each prefill and mixed step as the median of a few repeats, interleaved
with other points. A serving worker runs such steps back to back for as long as the load lasts.
Here each step kind runs both ways on one engine: a short burst (the profile's way), then
`--seconds` of the same step back to back, with the GPU's SM clock and power read about once a
second (nvidia-smi). The ratio of the last part's median to the burst's is what sustained serving
adds to the profile's step.

    python benchmarks/sustained_step_bench.py [--model random:llama-3.1-8b] [--seconds 20]
        [--chunks 2048,512] [--cached 0] [--decodes 16] [--context 4096]
(`--cached`: each chunk continues a prompt of that many computed tokens, as the later chunks of a
long prompt do, whose attention then dominates the step.)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from tandem import LLM
from tandem.planner.profile_points import StepProbe


def gpu_state() -> tuple[float, float]:
    """(SM clock MHz, power W) of GPU 0, or NaNs when nvidia-smi cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw",
                              "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=5).stdout
        clock, power = (float(v) for v in out.strip().split(","))
        return clock, power
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return float("nan"), float("nan")


def sustained(step, seconds: float) -> tuple[list[float], list[tuple[float, float]]]:
    """Step times of `step` run back to back for `seconds`, and the GPU states read meanwhile."""
    times, states = [], []
    start = next_read = time.perf_counter()
    while time.perf_counter() - start < seconds:
        times.append(step())
        if time.perf_counter() >= next_read:
            states.append(gpu_state())
            next_read += 1.0
    return times, states


class SteadyDecodes:
    """The decode rows beside a mixed chunk, placed again once they have grown `slack` tokens:
    each step adds one to every row, and a sustained run of a small model's steps (thousands)
    would otherwise time longer and longer contexts, and pass the engine's length limit."""

    def __init__(self, probe: StepProbe, batch: int, context: int, slack: int = 64):
        self.probe, self.batch, self.context, self.slack = probe, batch, context, slack
        self.rows = probe.place_decodes(batch, context)

    def mixed_s(self, chunk: int, cached: int) -> float:
        if self.rows and self.rows[0].num_tokens - self.context >= self.slack:
            for seq in self.rows:
                self.probe.remove(seq)
            self.rows = self.probe.place_decodes(self.batch, self.context)
        return self.probe.mixed_once(chunk, cached, self.rows)[0]


def report(name: str, burst_s: float, times: list[float], states: list[tuple[float, float]]
           ) -> None:
    tail = times[len(times) * 3 // 4:]
    tail_states = states[len(states) * 3 // 4:] or states
    clock = statistics.median(s[0] for s in tail_states)
    power = statistics.median(s[1] for s in tail_states)
    first_clock = states[0][0] if states else float("nan")
    print(f"{name:<34} burst {burst_s * 1e3:8.2f} ms | sustained, last quarter "
          f"{statistics.median(tail) * 1e3:8.2f} ms ({statistics.median(tail) / burst_s:.3f}x) | "
          f"{len(times)} steps | SM clock {first_clock:.0f} -> {clock:.0f} MHz, {power:.0f} W",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--chunks", default="2048,512")
    parser.add_argument("--decodes", type=int, default=16, help="decode rows beside a mixed chunk")
    parser.add_argument("--context", type=int, default=4096, help="each decode row's context")
    parser.add_argument("--cached", type=int, default=0,
                        help="computed tokens of the prompt each chunk continues")
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    llm = LLM(model=args.model, max_model_len=max(args.context, args.cached) + max(chunks) + 64,
              max_num_batched_tokens=max(chunks) + args.decodes)
    probe = StepProbe(llm.engine)
    print(f"{args.model}, GPU idle: SM clock {gpu_state()[0]:.0f} MHz", flush=True)
    cached = args.cached
    for chunk in chunks:
        probe.warm_up(chunk)
        time.sleep(2.0)  # let the clock settle back before the burst
        burst = statistics.median(probe.prefill_once(chunk, cached) for _ in range(5))
        times, states = sustained(lambda c=chunk: probe.prefill_once(c, cached), args.seconds)
        report(f"prefill {chunk} after {cached}", burst, times, states)
        decodes = SteadyDecodes(probe, args.decodes, args.context)
        time.sleep(2.0)
        burst = statistics.median(decodes.mixed_s(chunk, cached) for _ in range(5))
        times, states = sustained(lambda c=chunk: decodes.mixed_s(c, cached), args.seconds)
        report(f"mixed {chunk} after {cached} + {args.decodes} x {args.context}", burst, times,
               states)
        probe.clear()


if __name__ == "__main__":
    main()
