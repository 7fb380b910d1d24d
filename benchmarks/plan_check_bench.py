"""`tandem plan`'s pick against real serving: predicted goodput beside measured attainment.

    python benchmarks/plan_check_bench.py --profile planner/profiles/random-llama-3.1-8b-h200.json \
        --gpus 2 --slo ttft_ms=1000 itl_ms=40 --out-dir runs/plan-check \
        [--workload "--dataset random --input-len 4096 --output-len 256"] \
        [--sizing "--num-kv-blocks 24000 --max-model-len 32768"] [--fractions 0.8,1,1.2]

Runs `tandem plan` (its JSON in OUT_DIR/plan.json), starts `tandem serve` with the shape it picks
(the model the profile was measured with unless --model says otherwise, --device as given), and
sends the plan's own probe at each fraction of the predicted goodput: the same workload at that
rate for the plan's probe duration (at most its request cap), judged as the plan judges a probe
(planner/plan.py: all but the first 20% of the requests in order of sending, each against the
SLO; a probe whose backlog grows through it counts as 0). Each probe is also simulated with the
same flags (`tandem simulate`), so every row sets the simulator's attainment beside the real one.
The measured goodput is bracketed by the probed rates: at least the highest one that met the
target, below the lowest one that did not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from tandem.bench.records import RequestRecord
from tandem.planner.plan import (MAX_PROBE_REQUESTS, PROBE_DURATION_S, PlanSearch,
                                 judged_attainment, keeps_up)

CLI = [sys.executable, "-m", "tandem.launcher.cli"]
# The plan's floor of requests a probe (PlanSearch.min_requests).
MIN_PROBE_REQUESTS = next(f.default for f in dataclasses.fields(PlanSearch)
                          if f.name == "min_requests")


def shape_flags(best: dict) -> list[str]:
    """The flags both `tandem serve` and `tandem simulate` take for the plan's best shape."""
    return ["--num-prefill", str(best["num_prefill"]), "--num-decode", str(best["num_decode"]),
            "--remote-prefill-min-tokens", str(best["remote_prefill_min_tokens"]),
            "--max-num-batched-tokens", str(best["max_num_batched_tokens"])]


def probe_flags(rate_rps: float, duration_s: float, max_requests: int, seed: int,
                min_requests: int = MIN_PROBE_REQUESTS) -> list[str]:
    """The load flags of one probe at rate_rps, as the plan sizes it."""
    num_requests = min(max(min_requests, math.ceil(rate_rps * duration_s)), max_requests)
    return ["--request-rate", f"{rate_rps:g}", "--num-requests", str(num_requests),
            "--seed", str(seed)]


def records_of(summary: dict) -> list[RequestRecord]:
    """A bench or simulate JSON's per-request records (--save-requests), in order of sending."""
    records = [RequestRecord(r["request_index"], r["start_s"], r["ttft_ms"], tuple(r["itl_ms"]),
                             r["e2e_ms"], r["prompt_tokens"], r["cached_tokens"],
                             r["output_tokens"], error=r["error"])
               for r in summary["per_request"]]
    return sorted(records, key=lambda r: r.start_s)


def probe_attainment(summary: dict, search: PlanSearch) -> tuple[float, bool]:
    """(attainment as the plan judges a probe, whether its backlog stayed bounded)."""
    records = records_of(summary)
    return (judged_attainment(records, search.slo, search.warmup_fraction),
            keeps_up([r for r in records if r.is_ok]))


def measured_goodput(rows: list[dict], target: float) -> tuple[float | None, float | None]:
    """(the highest probed rate that met the target, the lowest probed rate above it that did
    not): the measured goodput lies between them."""
    met = {r["rate_rps"]: r["real"] >= target and r["real_keeps_up"] for r in rows}
    low = max((rate for rate, ok in met.items() if ok), default=None)
    high = min((rate for rate, ok in met.items() if not ok and (low is None or rate > low)),
               default=None)
    return low, high


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--slo", nargs="+", required=True, help="NAME=MS, as tandem plan takes")
    parser.add_argument("--attainment", type=float, default=0.9)
    parser.add_argument("--workload", default="--dataset random --input-len 4096 --output-len 256",
                        help="dataset flags of tandem plan, bench and simulate")
    parser.add_argument("--sizing", default="",
                        help="KV cache and context flags of tandem plan, serve and simulate")
    parser.add_argument("--fractions", default="0.8,1,1.2", help="of the predicted goodput")
    parser.add_argument("--probe-duration-s", type=float, default=PROBE_DURATION_S)
    parser.add_argument("--max-requests", type=int, default=MAX_PROBE_REQUESTS)
    parser.add_argument("--model", default=None, help="default: the profile's model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    from tests.serving_harness import start_server

    args.out_dir.mkdir(parents=True, exist_ok=True)
    workload, sizing = shlex.split(args.workload), shlex.split(args.sizing)
    slo = dict((name, float(ms)) for name, ms in (item.split("=", 1) for item in args.slo))
    search = PlanSearch(slo, args.attainment, args.max_requests,
                        probe_duration_s=args.probe_duration_s)
    plan_path = args.out_dir / "plan.json"
    subprocess.run([*CLI, "plan", "--profile", args.profile, "--gpus", str(args.gpus),
                    "--slo", *args.slo, "--attainment", str(args.attainment),
                    "--probe-duration-s", str(args.probe_duration_s),
                    "--max-requests-per-probe", str(args.max_requests), *workload, *sizing,
                    "--out", str(plan_path)], check=True)
    plan = json.loads(plan_path.read_text())
    best, model = plan["best"], args.model or plan["model"]
    predicted = best["goodput_rps"]
    print(f"plan: {best['name']}, predicted goodput {predicted:g} req/s", flush=True)
    server = start_server("--model", model, "--device", args.device, *shape_flags(best),
                          *sizing, timeout_s=600.0)
    rows = []
    try:
        for index, fraction in enumerate(float(f) for f in args.fractions.split(",")):
            rate = round(fraction * predicted, 3)
            # Each probe its own prompts: one server runs them all, and an earlier probe's
            # prompts would be prefix-cache hits.
            load = probe_flags(rate, args.probe_duration_s, args.max_requests, args.seed + index)
            real_path = args.out_dir / f"real-{fraction:g}.json"
            sim_path = args.out_dir / f"sim-{fraction:g}.json"
            subprocess.run([*CLI, "bench", "--backend", "grpc", "--url", server.grpc_address,
                            "--temperature", "0", "--no-progress", "--save-requests", *workload,
                            *load, "--slo", *args.slo, "--out", str(real_path)], check=True)
            subprocess.run([*CLI, "simulate", "--profile", args.profile, *shape_flags(best),
                            *sizing, *workload, *load, "--slo", *args.slo, "--save-requests",
                            "--out", str(sim_path)], check=True, capture_output=True)
            real, sim = (json.loads(p.read_text()) for p in (real_path, sim_path))
            (real_att, real_up), (sim_att, sim_up) = (probe_attainment(real, search),
                                                      probe_attainment(sim, search))
            rows.append({"fraction": fraction, "rate_rps": rate, "real": real_att,
                         "real_keeps_up": real_up, "sim": sim_att, "sim_keeps_up": sim_up,
                         "real_ttft_p50_ms": real["ttft_ms"]["p50"],
                         "real_tpot_p50_ms": real["tpot_ms"]["p50"]})
            print(f"  {rate:g} req/s: within the SLO real {real_att:.0%}"
                  f"{'' if real_up else ' (backlog grows)'}, simulated {sim_att:.0%}"
                  f"{'' if sim_up else ' (backlog grows)'}", flush=True)
    finally:
        server.stop()
        (args.out_dir / "server.log").write_text("".join(server.lines))
    low, high = measured_goodput(rows, args.attainment)
    result = {"shape": best["name"], "predicted_goodput_rps": predicted,
              "measured_goodput_at_least_rps": low, "measured_goodput_below_rps": high,
              "probes": rows, "serve_command": plan["serve_command"]}
    (args.out_dir / "check.json").write_text(json.dumps(result, indent=1))
    print(f"| rate | of predicted | real within SLO | simulated | real TTFT p50 | real TPOT p50 |\n"
          f"| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['rate_rps']:g} | {r['fraction']:g} | {r['real']:.0%} | {r['sim']:.0%} | "
              f"{r['real_ttft_p50_ms']:.0f} ms | {r['real_tpot_p50_ms']:.1f} ms |")
    print(f"{best['name']}: predicted goodput {predicted:g} req/s; measured at least "
          f"{low if low is not None else '-'} and below {high if high is not None else '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
