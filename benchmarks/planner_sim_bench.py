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
from tandem.planner.sizing import Load, SizingTarget, plan_pools
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
    config = sim_config_from_args(args, profile, num_prefill, num_decode,
                                  args.remote_prefill_min_tokens)
    result = Simulator(config, model).run(requests, [o - start_s for o in offsets_s])
    return result.records()


def length_mix(lengths: list[int]) -> tuple[tuple[float, float], ...]:
    """(mean tokens, share) per length class, the classes the router counts (bit length)."""
    classes: dict[int, list[int]] = {}
    for length in lengths:
        counts = classes.setdefault(length.bit_length(), [0, 0])
        counts[0] += 1
        counts[1] += length
    return tuple((tokens / n, n / len(lengths)) for _, (n, tokens) in sorted(classes.items()))


def arrival_dispersion(offsets_s: list[float], start_s: float, interval_s: float) -> float | None:
    """Variance over mean of the requests arriving in each second of the interval."""
    num_bins = max(1, int(interval_s))
    counts = [0] * num_bins
    for offset in offsets_s:
        counts[min(num_bins - 1, int(offset - start_s))] += 1
    mean = statistics.fmean(counts)
    return statistics.pvariance(counts) / mean if mean > 0 else None


def observe(records, requests, offsets_s, interval_s: float, now_s: float,
            workers) -> Observation:
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
        input_tokens_mix=length_mix([len(r.prompt_token_ids) for r in requests]),
        arrival_dispersion=arrival_dispersion(offsets_s, now_s - interval_s, interval_s),
        ttft_p50_ms=q(ttfts, 0.5), ttft_p90_ms=q(ttfts, 0.9),
        itl_p50_ms=q(gaps, 0.5), itl_p90_ms=q(gaps, 0.9),
        workers=tuple(WorkerView(w.worker_id, w.role, w.ready_at_s <= now_s) for w in workers))


def windows(offsets_s: list[float], interval_s: float) -> list[list[int]]:
    count = int(max(offsets_s) // interval_s) + 1
    out: list[list[int]] = [[] for _ in range(count)]
    for i, offset in enumerate(offsets_s):
        out[int(offset // interval_s)].append(i)
    return out


def simulate_hour(args, profile, model, requests, offsets_s, slos: list[dict],
                  planner: Planner | None, start_shape: tuple[int, int]) -> dict:
    """Attainment under each SLO of `slos` (the first is the one planned for), and GPU-hours."""
    interval_s = args.interval_s
    workers = [SimWorkerSlot(f"prefill-{i}", "prefill", 0.0) for i in range(start_shape[0])]
    workers += [SimWorkerSlot(f"decode-{i}", "decode", 0.0) for i in range(start_shape[1])]
    good = [0] * len(slos)
    sent, gpu_s, shapes = 0, 0.0, []
    served: dict[tuple[int, int], list[int]] = {}
    for k, indexes in enumerate(windows(offsets_s, interval_s)):
        start_s = k * interval_s
        ready = [w for w in workers if w.ready_at_s <= start_s]
        shape = (sum(w.role == "prefill" for w in ready), max(1, sum(w.role == "decode"
                                                                    for w in ready)))
        shapes.append(shape)
        gpu_s += len(workers) * interval_s  # a starting worker holds its GPU already
        window, window_offsets_s = [requests[i] for i in indexes], [offsets_s[i] for i in indexes]
        records = run_window(args, profile, model, shape, window, window_offsets_s,
                             start_s) if window else []
        for n, slo in enumerate(slos):
            good[n] += sum(1 for r in records if r.is_ok and meets_slo(r, slo))
        sent += len(window)
        missed = sum(1 for r in records if not (r.is_ok and meets_slo(r, slos[0])))
        by_shape = served.setdefault(shape, [0, 0, 0])   # intervals, requests, missed
        by_shape[0] += 1
        by_shape[1] += len(window)
        by_shape[2] += missed
        if planner is None:
            continue
        now_s = start_s + interval_s
        decision = planner.on_tick(observe(records, window, window_offsets_s, interval_s, now_s,
                                           workers))
        workers = apply_actions(args, workers, decision.actions, now_s)
        print(f"t={now_s:5.0f} s {len(window):4d} req {missed:3d} missed  shape "
              f"{shape[0]}P+{shape[1]}D  {decision.kind}: {decision.reason[:170]}", flush=True)
    return {"attainment": [g / sent if sent else 0.0 for g in good],
            "gpu_hours": gpu_s / 3600, "num_requests": sent, "shapes": shapes,
            "by_shape": served}


def apply_actions(args, workers: list[SimWorkerSlot], actions, now_s: float
                  ) -> list[SimWorkerSlot]:
    """The workers after a decision: an add serves after the cold start, a flip after --flip-s."""
    for n, action in enumerate(actions):
        if isinstance(action, AddWorker):  # ids never reused: the time asked for, the index
            workers.append(SimWorkerSlot(f"{action.role}-t{now_s:.0f}-{n}", action.role,
                                         now_s + args.cold_start_s))
        elif isinstance(action, RemoveWorker):
            workers = [w for w in workers if w.worker_id != action.worker_id]
        elif isinstance(action, FlipRole):
            for w in workers:
                if w.worker_id == action.worker_id:
                    w.role, w.ready_at_s = action.to_role, now_s + args.flip_s
    return workers


def best_static(args, profile, model, requests, offsets_s, slo, config,
                routing) -> tuple[int, int]:
    """Fewest GPUs whose attainment over the peak intervals reaches the target."""
    if args.static_shape:
        num_prefill, num_decode = (int(n) for n in args.static_shape.split(","))
        return num_prefill, num_decode
    peak = [i for i, o in enumerate(offsets_s)
            if abs(o - max(offsets_s) / 2) <= args.peak_window_s / 2]
    start_s = min(offsets_s[i] for i in peak)
    sized = sized_shape(model, config, routing, [requests[i] for i in peak],
                        [offsets_s[i] for i in peak], args.peak_window_s)
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
            print(f"static {shape[0]}P+{shape[1]}D at the peak: {attained:.2%} "
                  f"({round(attained * len(peak))} of {len(peak)})", flush=True)
            scored.append((attained, shape))
        attained, shape = max(scored)
        if attained >= args.target:
            return shape
    return max(scored)[1]


def sized_shape(model, config: PlannerConfig, routing, window, offsets_s, window_s: float
                ) -> tuple[int, int]:
    """The planner's own sizing (planner.sizing) of a window's requests, no prefix hits known."""
    lengths = [len(r.prompt_token_ids) for r in window]
    load = Load(len(window) / window_s, statistics.fmean(lengths),
                statistics.fmean(r.output_len for r in window), 0.0, length_mix(lengths),
                max(1.0, arrival_dispersion(offsets_s, min(offsets_s), window_s) or 1.0))
    target = SizingTarget(config.ttft_ms, config.itl_ms, config.max_utilization,
                          attainment=config.attainment,
                          max_prefill_queue=routing.max_prefill_queue,
                          remote_prefill_min_tokens=routing.remote_prefill_min_tokens)
    bounds = {role: config.pool_bounds(role) for role in ("prefill", "decode", "both")}
    plan = plan_pools(model, load, target, "disagg", bounds, config.max_workers, "disagg")
    return plan.num_prefill, plan.num_decode


def parse_slo(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (item.split("=") for item in text.replace(",", " ").split())}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    bench = parser.add_argument_group("planner bench")
    bench.add_argument("--swing", type=float, default=4.0, help="peak rate over trough rate")
    bench.add_argument("--interval-s", type=float, default=60.0)
    bench.add_argument("--cold-start-s", type=float, default=120.0)
    bench.add_argument("--flip-s", type=float, default=5.0)
    bench.add_argument("--gpu-budget", type=int, default=16)
    bench.add_argument("--start-prefill", type=int, default=None,
                       help="default: the planner's sizing of the first interval's load")
    bench.add_argument("--start-decode", type=int, default=None)
    bench.add_argument("--static-shape", default=None, metavar="P,D",
                       help="the static baseline's shape, instead of searching for it")
    bench.add_argument("--peak-window-s", type=float, default=300.0)
    bench.add_argument("--target", type=float, default=0.99)
    bench.add_argument("--planner-slo", nargs="+", default=["ttft_ms=10000", "itl_ms=50"])
    bench.add_argument("--report-slo", action="append", default=[], metavar="'ttft_ms=.. itl_ms=..'",
                       help="also report attainment under this SLO (repeatable)")
    bench.add_argument("--hold-intervals", type=float, default=2.0,
                       help="the planner's hold_s, in intervals (its default is 180 s)")
    bench.add_argument("--cooldown-intervals", type=float, default=1.0)
    bench.add_argument("--scale-down-margin", type=float, default=0.1)
    bench.add_argument("--predictor", default="damped_trend")
    bench.add_argument("--predictor-window", type=int, default=4)
    bench.add_argument("--trend-damping", type=float, default=0.85)
    bench.add_argument("--shape-window", type=int, default=None,
                       help="intervals the workload's shape is averaged over (default: "
                            "--predictor-window)")


def planner_config(args, slo: dict[str, float]) -> PlannerConfig:
    return PlannerConfig(mode="on", interval_s=args.interval_s, ttft_ms=slo["ttft_ms"],
                         itl_ms=slo["itl_ms"], gpu_budget=args.gpu_budget,
                         hold_s=args.hold_intervals * args.interval_s,
                         cooldown_s=args.cooldown_intervals * args.interval_s,
                         ready_timeout_s=args.cold_start_s * 3, max_changes_per_interval=4,
                         predictor=args.predictor, predictor_window=args.predictor_window,
                         shape_window=args.shape_window, trend_damping=args.trend_damping,
                         worker_start_s=args.cold_start_s, attainment=args.target,
                         scale_down_margin=args.scale_down_margin)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_simulate_arguments(parser)
    add_bench_arguments(parser)
    argv = sys.argv[1:]
    if "--dataset" not in argv:
        argv += ["--dataset", "trace:/work/shared/traces/conversation_trace.jsonl"]
    args = parser.parse_args(argv)
    slos = [parse_slo(" ".join(args.planner_slo))] + [parse_slo(t) for t in args.report_slo]
    profile, model = load_profile(args)
    requests = build_requests(args)
    offsets_s = warp_offsets([r.arrival_offset_s or 0.0 for r in requests], args.swing)
    started = time.perf_counter()
    config = planner_config(args, slos[0])
    routing = sim_config_from_args(args, profile, 1, 1, args.remote_prefill_min_tokens).routing
    static = best_static(args, profile, model, requests, offsets_s, slos[0], config, routing)
    first = windows(offsets_s, args.interval_s)[0]
    start = (args.start_prefill, args.start_decode)
    if None in start:
        start = sized_shape(model, config, routing, [requests[i] for i in first],
                            [offsets_s[i] for i in first], args.interval_s)
    print(f"planner starts at {start[0]}P+{start[1]}D; static {static[0]}P+{static[1]}D",
          flush=True)
    planned = simulate_hour(args, profile, model, requests, offsets_s, slos,
                            Planner(config, model, routing=routing), start)
    fixed = simulate_hour(args, profile, model, requests, offsets_s, slos, None, static)
    report(slos, planned, fixed, static)
    print(f"{planned['num_requests']} requests, {time.perf_counter() - started:.0f} s wall")
    return 0


def report(slos, planned: dict, fixed: dict, static: tuple[int, int]) -> None:
    for n, slo in enumerate(slos):
        name = " ".join(f"{k}={v:g}" for k, v in slo.items())
        print(f"SLO {name}{' (planned for)' if n == 0 else ''}: planner "
              f"{planned['attainment'][n]:.2%}, static {static[0]}P+{static[1]}D "
              f"{fixed['attainment'][n]:.2%}")
    print(f"GPU-hours: planner {planned['gpu_hours']:.2f}, static {fixed['gpu_hours']:.2f} "
          f"({planned['gpu_hours'] / fixed['gpu_hours']:.0%})")
    print("the planner's intervals by the shape that served them (misses under the planned SLO):")
    for (num_prefill, num_decode), (intervals, requests, missed) in sorted(
            planned["by_shape"].items()):
        print(f"  {num_prefill}P+{num_decode}D: {intervals} intervals, {requests} requests, "
              f"{missed} missed ({missed / max(requests, 1):.2%})")


if __name__ == "__main__":
    sys.exit(main())
