"""The online planner against the best static allocation, in the simulator, on the conversation
trace with its rate swung 4x over the hour.

The trace's arrival times are warped so the request rate follows a sine between 0.4x and 1.6x of
the trace's own mean (a 4x swing, peak in the middle of the hour); prompts, outputs and prefix
structure are unchanged. The hour is cut into planner intervals. Each interval's requests run to
completion in the simulator (planner/simulator.py: tandem's real scheduler, block manager, router)
on the deployment shape of that interval, and the real `Planner.on_tick` sees an Observation built
from that interval (rate, lengths, hit rate, TTFT and ITL percentiles, workers), then picks the next
interval's shape. An added worker serves from the first interval that starts `--cold-start-s` after
it was asked for; a flip takes `--flip-s` (measured on a CPU: benchmarks/RESULTS.md), so it serves
from the next interval; a removal takes effect at once.

The simulator has a fixed shape per run, so intervals are simulated one by one: each starts with an
empty prefix cache and no requests carried over. The static baseline is simulated the same way, so
the two compare like for like; absolute attainment is a little pessimistic for both.

Static baseline: the smallest disaggregated shape (fewest GPUs, then best attainment) that keeps
>= the target attainment over the peak intervals, run for the whole hour.

    python benchmarks/planner_sim_bench.py --profile planner/profiles/random-llama-3.1-8b-h200.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass

from tandem.bench.metrics import meets_slo
from tandem.planner.config import PlannerConfig
from tandem.planner.observation import AddWorker, FlipRole, Observation, RemoveWorker, WorkerView
from tandem.planner.policy import Planner
from tandem.planner.simulate_cli import (add_simulate_arguments, load_profile,
                                         sim_config_from_args)
from tandem.planner.simulator import Simulator
from tandem.bench.cli import build_requests


@dataclass
class SimWorkerSlot:
    worker_id: str
    role: str
    ready_at_s: float


def warp_offsets(offsets_s: list[float], swing: float) -> list[float]:
    """Arrival times under a rate that follows 1 + a*sin(...) with max/min = swing, same mean."""
    span_s = max(offsets_s) or 1.0
    a = (swing - 1) / (swing + 1)
    # Cumulative intensity of rate(t) = 1 - a*cos(2*pi*t/span): peak at mid-hour. Invert numerically.
    grid = [span_s * i / 4000 for i in range(4001)]
    cum = [t - a * span_s / (2 * math.pi) * math.sin(2 * math.pi * t / span_s) for t in grid]
    warped, j = [], 0
    for offset in sorted(offsets_s):
        while j < len(cum) - 2 and cum[j + 1] < offset:
            j += 1
        lo, hi = cum[j], cum[j + 1]
        frac = 0.0 if hi == lo else (offset - lo) / (hi - lo)
        warped.append(grid[j] + frac * (grid[j + 1] - grid[j]))
    return warped


def run_window(args, profile, model, shape: tuple[int, int], requests, offsets_s, start_s: float):
    num_prefill, num_decode = shape
    config = sim_config_from_args(args, profile, num_prefill, num_decode)
    result = Simulator(config, model).run(requests, [o - start_s for o in offsets_s])
    return result.records()


def observe(records, requests, interval_s: float, now_s: float, workers) -> Observation:
    ok = [r for r in records if r.is_ok]
    ttfts = sorted(r.ttft_ms for r in ok if r.ttft_ms is not None)
    gaps = sorted(g for r in ok for g in r.itl_ms)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None  # noqa: E731
    prompt = sum(r.prompt_tokens for r in ok)
    return Observation(
        time_s=now_s, interval_s=interval_s,
        request_rate_per_s=len(requests) / interval_s if requests else None,
        mean_input_tokens=statistics.fmean(r.prompt_tokens for r in ok) if ok else None,
        mean_output_tokens=statistics.fmean(r.output_tokens for r in ok) if ok else None,
        prefix_hit_rate=sum(r.cached_tokens for r in ok) / prompt if prompt else None,
        ttft_p50_ms=q(ttfts, 0.5), ttft_p90_ms=q(ttfts, 0.9),
        itl_p50_ms=q(gaps, 0.5), itl_p90_ms=q(gaps, 0.9),
        workers=tuple(WorkerView(w.worker_id, w.role, w.ready_at_s <= now_s) for w in workers))


def windows(offsets_s: list[float], interval_s: float) -> list[list[int]]:
    count = int(max(offsets_s) // interval_s) + 1
    out: list[list[int]] = [[] for _ in range(count)]
    for i, offset in enumerate(offsets_s):
        out[int(offset // interval_s)].append(i)
    return out


def simulate_hour(args, profile, model, requests, offsets_s, slo, planner: Planner | None,
                  static_shape: tuple[int, int] | None) -> dict:
    interval_s = args.interval_s
    workers = [SimWorkerSlot(f"prefill-{i}", "prefill", 0.0)
               for i in range(static_shape[0] if static_shape else args.start_prefill)]
    workers += [SimWorkerSlot(f"decode-{i}", "decode", 0.0)
                for i in range(static_shape[1] if static_shape else args.start_decode)]
    next_id = len(workers)
    good = sent = 0
    gpu_s = 0.0
    for k, indexes in enumerate(windows(offsets_s, interval_s)):
        start_s = k * interval_s
        ready = [w for w in workers if w.ready_at_s <= start_s]
        shape = (sum(w.role == "prefill" for w in ready), max(1, sum(w.role == "decode"
                                                                    for w in ready)))
        gpu_s += len(workers) * interval_s  # a starting worker holds its GPU already
        window = [requests[i] for i in indexes]
        records = run_window(args, profile, model, shape, window,
                             [offsets_s[i] for i in indexes], start_s) if window else []
        good += sum(1 for r in records if r.is_ok and meets_slo(r, slo))
        sent += len(window)
        if planner is None:
            continue
        now_s = start_s + interval_s
        decision = planner.on_tick(observe(records, window, interval_s, now_s, workers))
        for action in decision.actions:
            if isinstance(action, AddWorker):
                workers.append(SimWorkerSlot(f"{action.role}-{next_id}", action.role,
                                             now_s + args.cold_start_s))
                next_id += 1
            elif isinstance(action, RemoveWorker):
                workers = [w for w in workers if w.worker_id != action.worker_id]
            elif isinstance(action, FlipRole):
                for w in workers:
                    if w.worker_id == action.worker_id:
                        w.role, w.ready_at_s = action.to_role, now_s + args.flip_s
        print(f"t={now_s:5.0f} s {len(window):4d} req  shape {shape[0]}P+{shape[1]}D  "
              f"{decision.kind}: {decision.reason[:150]}", flush=True)
    return {"attainment": good / sent if sent else 0.0, "gpu_hours": gpu_s / 3600,
            "num_requests": sent}


def best_static(args, profile, model, requests, offsets_s, slo) -> tuple[int, int]:
    """Fewest GPUs whose attainment over the peak intervals reaches the target."""
    peak = [i for i, o in enumerate(offsets_s)
            if abs(o - max(offsets_s) / 2) <= args.peak_window_s / 2]
    start_s = min(offsets_s[i] for i in peak)
    sized = _sized_shape(args, model, [requests[i] for i in peak], slo)
    print(f"the planner's sizing of the peak: {sized[0]}P+{sized[1]}D; searching from "
          f"{sum(sized) - 1} GPUs", flush=True)
    for num_gpus in range(max(2, sum(sized) - 1), args.gpu_budget + 1):
        # The splits next to the sized one: the others lose on one pool or the other.
        low = max(1, round(sized[0] * num_gpus / sum(sized)) - 1)
        shapes = [(p, num_gpus - p) for p in range(low, min(low + 3, num_gpus))]
        scored = []
        for shape in shapes:
            records = run_window(args, profile, model, shape, [requests[i] for i in peak],
                                 [offsets_s[i] for i in peak], start_s)
            attained = sum(1 for r in records if r.is_ok and meets_slo(r, slo)) / len(peak)
            print(f"static {shape[0]}P+{shape[1]}D at the peak: {attained:.1%}", flush=True)
            scored.append((attained, shape))
        attained, shape = max(scored)
        if attained >= args.target:
            return shape
    return max(scored)[1]


def _sized_shape(args, model, peak_requests, slo) -> tuple[int, int]:
    from tandem.planner.sizing import Load, SizingTarget, plan_pools
    rate = len(peak_requests) / args.peak_window_s
    load = Load(rate, statistics.fmean(len(r.prompt_token_ids) for r in peak_requests),
                statistics.fmean(r.output_len for r in peak_requests))
    bounds = {"prefill": (1, args.gpu_budget), "decode": (1, args.gpu_budget),
              "both": (1, args.gpu_budget)}
    plan = plan_pools(model, load, SizingTarget(slo["ttft_ms"], slo["itl_ms"], 0.8, 256, 512),
                      "disagg", bounds, args.gpu_budget, "disagg")
    return plan.num_prefill, plan.num_decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_simulate_arguments(parser)
    bench = parser.add_argument_group("planner bench")
    bench.add_argument("--swing", type=float, default=4.0, help="peak rate over trough rate")
    bench.add_argument("--interval-s", type=float, default=60.0)
    bench.add_argument("--cold-start-s", type=float, default=120.0)
    bench.add_argument("--flip-s", type=float, default=5.0)
    bench.add_argument("--gpu-budget", type=int, default=16)
    bench.add_argument("--start-prefill", type=int, default=1)
    bench.add_argument("--start-decode", type=int, default=1)
    bench.add_argument("--peak-window-s", type=float, default=300.0)
    bench.add_argument("--target", type=float, default=0.99)
    bench.add_argument("--planner-slo", nargs="+", default=["ttft_ms=2000", "itl_ms=50"])
    argv = sys.argv[1:]
    if "--dataset" not in argv:
        argv += ["--dataset", "trace:/work/shared/traces/conversation_trace.jsonl"]
    args = parser.parse_args(argv)
    slo = {k: float(v) for k, v in (item.split("=") for item in args.planner_slo)}
    profile, model = load_profile(args.profile)
    requests = build_requests(args)
    offsets_s = warp_offsets([r.arrival_offset_s or 0.0 for r in requests], args.swing)
    started = time.perf_counter()
    static = best_static(args, profile, model, requests, offsets_s, slo)
    config = PlannerConfig(mode="on", interval_s=args.interval_s, ttft_ms=slo["ttft_ms"],
                           itl_ms=slo["itl_ms"], gpu_budget=args.gpu_budget,
                           hold_s=5 * args.interval_s, cooldown_s=2 * args.interval_s,
                           ready_timeout_s=args.cold_start_s * 3, max_changes_per_interval=4)
    planned = simulate_hour(args, profile, model, requests, offsets_s, slo, Planner(config, model),
                            None)
    fixed = simulate_hour(args, profile, model, requests, offsets_s, slo, None, static)
    print(f"planner: {planned['attainment']:.2%} within SLO, {planned['gpu_hours']:.2f} GPU-h")
    print(f"static {static[0]}P+{static[1]}D: {fixed['attainment']:.2%} within SLO, "
          f"{fixed['gpu_hours']:.2f} GPU-h")
    print(f"planner GPU-hours / static: {planned['gpu_hours'] / fixed['gpu_hours']:.0%}; "
          f"{planned['num_requests']} requests, {time.perf_counter() - started:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
