"""How close the simulator comes to real serving: the same requests, real and simulated.

    # on two GPUs: real `tandem serve` + `tandem bench` for every case, one JSON each
    python benchmarks/sim_accuracy_bench.py real --out-dir runs/ [--model random:llama-3.1-8b]
    # anywhere (no GPU): `tandem simulate` on the same cases, and the error table
    python benchmarks/sim_accuracy_bench.py sim --out-dir runs/ --profile PROFILE.json

Cases: two layouts on two GPUs (1 prefill + 1 decode; 2 aggregated workers) at three loads (light,
near the knee, past it), for ISL 4096 / OSL 256 (Poisson, fresh prompts) and the conversation trace
(../shared/traces, its 512-token blocks replayed as 128 tokens, outputs halved, arrival times
scaled). The real server runs with a fixed KV cache size and context length, which the simulation
is given too, so both hold the same number of blocks. Errors are relative to the real run: TTFT p50
and p90 (target within 10%), TPOT p50 and output throughput (within 5%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl"
NUM_KV_BLOCKS = 24000   # 48 GiB of 2 MiB llama-3.1-8b blocks: room for the past-knee backlog
MAX_MODEL_LEN = 8192
LAYOUTS = {"1p1d": ("1", "1"), "2agg": ("0", "2")}


@dataclass(frozen=True)
class Case:
    name: str
    workload: tuple[str, ...]  # `tandem bench` / `tandem simulate` dataset and load flags


def cases(trace: Path) -> list[Case]:
    random_flags = ("--dataset", "random", "--input-len", "4096", "--output-len", "256",
                    "--vocab-size", "120000")
    out = [Case(f"isl4096-{rate}rps", (*random_flags, "--request-rate", str(rate),
                                       "--num-requests", str(int(rate * 25))))
           for rate in (3, 6, 9)]
    trace_flags = ("--dataset", f"trace:{trace}", "--num-requests", "200",
                   "--trace-block-tokens", "128", "--output-scale", "0.5")
    out += [Case(f"trace-x{1 / scale:.0f}", (*trace_flags, "--time-scale", str(scale)))
            for scale in (1.0, 0.5, 0.3)]
    return out


def serve_flags(layout: str, model: str, device: str) -> list[str]:
    num_prefill, num_decode = LAYOUTS[layout]
    return ["--model", model, "--device", device, "--num-prefill", num_prefill,
            "--num-decode", num_decode, "--num-kv-blocks", str(NUM_KV_BLOCKS),
            "--max-model-len", str(MAX_MODEL_LEN)]


def run_real(out_dir: Path, model: str, device: str, layouts: list[str], trace: Path) -> None:
    from tests.serving_harness import start_server

    for layout in layouts:
        started = time.perf_counter()
        server = start_server(*serve_flags(layout, model, device), timeout_s=480.0)
        print(f"{layout}: ready in {time.perf_counter() - started:.0f} s", flush=True)
        try:
            for case in cases(trace):
                out = out_dir / f"real-{layout}-{case.name}.json"
                command = [sys.executable, "-m", "tandem.launcher.cli", "bench", "--url",
                           server.http_url, "--temperature", "0", "--no-progress",
                           *case.workload, "--out", str(out)]
                subprocess.run(command, check=True, timeout=300)
                print(f"  {case.name}: {summary_line(json.loads(out.read_text()))}", flush=True)
        finally:
            server.stop()


def run_sim(out_dir: Path, profile: str, layouts: list[str], trace: Path) -> list[dict]:
    rows = []
    for layout in layouts:
        num_prefill, num_decode = LAYOUTS[layout]
        for case in cases(trace):
            real_path = out_dir / f"real-{layout}-{case.name}.json"
            if not real_path.exists():
                continue
            out = out_dir / f"sim-{layout}-{case.name}.json"
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "tandem.launcher.cli", "simulate",
                            "--profile", profile, "--num-prefill", num_prefill,
                            "--num-decode", num_decode, "--num-kv-blocks", str(NUM_KV_BLOCKS),
                            "--max-model-len", str(MAX_MODEL_LEN), *case.workload,
                            "--out", str(out)], check=True, capture_output=True, timeout=600)
            rows.append(compare(layout, case.name, json.loads(real_path.read_text()),
                                json.loads(out.read_text()), time.perf_counter() - started))
    return rows


def compare(layout: str, case: str, real: dict, sim: dict, sim_s: float) -> dict:
    def error(path: tuple[str, ...]) -> tuple[float | None, float | None, float | None]:
        a, b = real, sim
        for key in path:
            a, b = a[key], b[key]
        return a, b, (None if not a or b is None else (b - a) / a)

    return {"layout": layout, "case": case, "sim_s": sim_s,
            "ttft_p50": error(("ttft_ms", "p50")), "ttft_p90": error(("ttft_ms", "p90")),
            "tpot_p50": error(("tpot_ms", "p50")),
            "throughput": error(("output_token_throughput",))}


def summary_line(summary: dict) -> str:
    return (f"TTFT p50 {summary['ttft_ms']['p50']:.0f} ms p90 {summary['ttft_ms']['p90']:.0f} ms, "
            f"TPOT p50 {summary['tpot_ms']['p50']:.1f} ms, "
            f"{summary['output_token_throughput']:.0f} tok/s, errors {summary['num_errors']}")


def print_table(rows: list[dict]) -> None:
    print("| layout | case | TTFT p50 real / sim (err) | TTFT p90 real / sim (err) | "
          "TPOT p50 real / sim (err) | tok/s real / sim (err) | sim s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        cells = [_cell(row[key]) for key in ("ttft_p50", "ttft_p90", "tpot_p50", "throughput")]
        print(f"| {row['layout']} | {row['case']} | {' | '.join(cells)} | {row['sim_s']:.1f} |")


def _cell(values: tuple) -> str:
    real, sim, err = values
    if real is None or sim is None:
        return "-"
    return f"{real:.1f} / {sim:.1f} ({'-' if err is None else f'{err:+.0%}'})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("real", "sim"))
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--device", default="cuda", help="real: cuda (one GPU per worker) or cpu")
    parser.add_argument("--profile", help="sim: the profile of the real run's model and GPU")
    parser.add_argument("--layouts", default="1p1d,2agg")
    parser.add_argument("--trace", type=Path, default=TRACE)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    layouts = args.layouts.split(",")
    if args.phase == "real":
        run_real(args.out_dir, args.model, args.device, layouts, args.trace)
        return 0
    if not args.profile:
        parser.error("sim needs --profile")
    rows = run_sim(args.out_dir, args.profile, layouts, args.trace)
    (args.out_dir / "accuracy.json").write_text(json.dumps(rows, indent=1))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
