"""`tandem plan`: rank deployment shapes for N GPUs by simulated goodput per GPU under an SLO.

    tandem plan --profile PROFILE.json --gpus 2 --dataset random --input-len 4096 \
        --output-len 256 --request-rate 6 --slo ttft_ms=1000 itl_ms=40 --out plan.json

Takes `tandem bench`'s dataset and load flags (the request rate is the rate to meet; the search
sets its own rates) and `tandem simulate`'s deployment flags. Writes the table (every shape, its
goodput and every probe), the best shape, the fewest GPUs that meet the SLO at --request-rate,
and prints the `tandem serve` command for the best shape. planner/plan.py has the definitions.
Standalone: `python -m tandem.planner.plan_cli`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable

from tandem.bench.cli import add_workload_arguments, build_requests
from tandem.bench.metrics import parse_slo
from tandem.planner.standalone import run_standalone
from tandem.planner.plan import (MAX_PROBE_REQUESTS, PROBE_DURATION_S, PlanSearch, Planner, Shape,
                                 fewest_gpus, shapes_for)
from tandem.planner.simulate_cli import (add_deployment_arguments, load_profile,
                                         serving_overheads, sim_config_from_args)

logger = logging.getLogger(__name__)


def add_plan_parser(subcommands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `plan`; the parsed args carry `func(args) -> int`."""
    parser = subcommands.add_parser(
        "plan", help="pick a deployment shape for N GPUs from a profile and an SLO",
        description="Search aggregated and prefill:decode shapes with the simulator; rank them "
                    "by goodput per GPU under an SLO.")
    add_plan_arguments(parser)
    parser.set_defaults(func=plan_main)
    return parser


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plan")
    group.add_argument("--gpus", type=int, required=True, help="GPUs to lay out")
    group.add_argument("--attainment", type=float, default=0.9,
                       help="fraction of requests that must meet the SLO")
    group.add_argument("--remote-prefill-min-tokens", type=int, nargs="+", default=None,
                       help="thresholds to try (default: the router's)")
    group.add_argument("--chunk-sizes", type=int, nargs="+", default=None,
                       help="max_num_batched_tokens values to try (default: the engine's and "
                            "a quarter of it)")
    group.add_argument("--max-requests-per-probe", type=int, default=MAX_PROBE_REQUESTS,
                       help="cap on the requests one probe simulates")
    group.add_argument("--probe-duration-s", type=float, default=PROBE_DURATION_S,
                       help="a probe at rate r simulates r x this many requests (capped)")
    group.add_argument("--out", default=None, help="write the plan as JSON")
    group.add_argument("--plot", default=None, help="attainment against rate per shape (PNG)")
    add_deployment_arguments(parser)
    add_workload_arguments(parser)


def plan_main(args: argparse.Namespace) -> int:
    search = PlanSearch(parse_slo(args.slo), args.attainment, args.max_requests_per_probe,
                        seed=args.seed, burstiness=args.burstiness,
                        probe_duration_s=args.probe_duration_s)
    if args.num_requests is None and not args.dataset.startswith("trace:"):
        args.num_requests = search.max_requests  # the pool each probe takes its first n from
    profile, model = load_profile(args)
    base = sim_config_from_args(args, profile, 0, 1)
    thresholds = args.remote_prefill_min_tokens or [base.routing.remote_prefill_min_tokens]
    chunks = args.chunk_sizes or sorted({base.engine.max_num_batched_tokens,
                                         max(base.block_size, base.engine.max_num_batched_tokens
                                             // 4)}, reverse=True)
    planner = Planner(base, model, build_requests(args), search)
    start_rps = 0.5 * args.gpus
    shapes = _shapes(model, thresholds, chunks)
    if not model.has_transfer:
        print("no KV transfer points in the profile and no --transfer-gbps: aggregated shapes "
              "only")
    results = [planner.goodput(shape, start_rps) for shape in shapes(args.gpus)]
    results.sort(key=lambda r: r.goodput_per_gpu, reverse=True)
    best = results[0]
    document = {
        "profile": args.profile, "model": profile.get("model"), "gpus": args.gpus,
        "slo": search.slo, "attainment_target": search.attainment,
        "slo_rule": "TTFT <= ttft_ms and every inter-token gap <= itl_ms "
                    "(tandem.bench.metrics.meets_slo)",
        "num_requests_per_probe": len(planner.requests),
        "serving_overheads": serving_overheads(args, profile),
        "transfer": (f"link of {args.transfer_gbps:g} GB/s, {args.transfer_latency_us:g} us a "
                     "transfer (--transfer-gbps)" if args.transfer_gbps is not None
                     else "the profile's measured points" if model.has_transfer
                     else "none: aggregated shapes only"),
        "table": [r.to_json_dict() for r in results],
        "best": results[0].to_json_dict(),
        "serve_command": serve_command(best.shape, profile.get("model")),
    }
    if math.isfinite(args.request_rate):
        document["fewest_gpus"] = _fewest(planner, args, shapes)
    print("serving overheads: " + ", ".join(
        f"{name} {value:g}" for name, value in document["serving_overheads"].items()))
    print(_format_table(results))
    print(f"best: {best.shape.name}, goodput {best.goodput_rps:.2f} req/s "
          f"({best.goodput_per_gpu:.2f} per GPU)")
    if "fewest_gpus" in document:
        fewest = document["fewest_gpus"]
        print(f"fewest GPUs meeting the SLO at {args.request_rate:g} req/s: "
              f"{fewest['num_gpus'] if fewest else 'more than ' + str(args.gpus)}")
    print(document["serve_command"])
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=2)
            file.write("\n")
    if args.plot:
        save_plan_plot(results, args.plot, search.attainment)
    return 0


def serve_command(shape: Shape, model: str | None) -> str:
    return (f"tandem serve --model {model or 'MODEL'} --num-prefill {shape.num_prefill} "
            f"--num-decode {shape.num_decode} "
            f"--remote-prefill-min-tokens {shape.remote_prefill_min_tokens} "
            f"--max-num-batched-tokens {shape.max_num_batched_tokens}")


def _shapes(model, thresholds, chunks) -> Callable[[int], list[Shape]]:
    """The shapes for n GPUs: every one, or the aggregated ones where transfers cannot be
    priced (a one-device profile and no --transfer-gbps)."""
    def shapes(num_gpus: int) -> list[Shape]:
        found = shapes_for(num_gpus, thresholds, chunks)
        return found if model.has_transfer else [s for s in found if s.num_prefill == 0]
    return shapes


def _fewest(planner: Planner, args: argparse.Namespace,
            shapes: Callable[[int], list[Shape]]) -> dict | None:
    best: dict[int, tuple[Shape, float]] = {}

    def meets(num_gpus: int) -> bool:
        best[num_gpus] = planner.best_at(shapes(num_gpus), args.request_rate)
        return best[num_gpus][1] >= planner.search.attainment

    num_gpus = fewest_gpus(meets, args.gpus)
    if num_gpus is None:
        return None
    shape, attainment = best[num_gpus]
    return {"num_gpus": num_gpus, "rate_rps": args.request_rate, "shape": shape.name,
            "attainment": attainment, "serve_command": serve_command(shape, None)}


def _format_table(results) -> str:
    lines = [f"{'shape':<40} {'goodput req/s':>14} {'per GPU':>9}"]
    lines += [f"{r.shape.name:<40} {r.goodput_rps:>14.2f} {r.goodput_per_gpu:>9.2f}"
              for r in results]
    return "\n".join(lines)


def save_plan_plot(results, path: str, target: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for result in results:
        points = sorted(result.probes)
        axes.plot([r for r, _ in points], [a for _, a in points], marker="o",
                  label=result.shape.name)
    axes.axhline(target, color="grey", linestyle="--", label=f"target {target:g}")
    axes.set_xscale("log")
    axes.set_xlabel("request rate (req/s)")
    axes.set_ylabel("SLO attainment")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    return run_standalone("python -m tandem.planner.plan_cli", "tandem's capacity planner",
                          add_plan_arguments, plan_main, argv)


if __name__ == "__main__":
    sys.exit(main())
