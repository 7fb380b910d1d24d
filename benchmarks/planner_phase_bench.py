"""A workload that changes phase, served by the planner against the two static layouts (2x H200).

Phase 1: long prompts, short outputs (prefill-heavy: 1 prefill + 1 decode is the better layout);
phase 2: short prompts, long outputs (decode-heavy: 2 aggregated workers are). Each layout serves
both phases back to back with `tandem bench` (random dataset, Poisson arrivals); the score is SLO
attainment over the whole run (requests meeting TTFT and worst-gap ITL bounds over requests sent),
which the planner must win by flipping a worker between the phases.

Against a server you started (one layout at a time):

    tandem serve --model random:llama-3.1-8b --num-prefill 1 --num-decode 1 --config p.yaml \
        --slo ttft_ms=500 itl_ms=40 --gpu-budget 2 --planner-interval-s 10
    # p.yaml: planner: {mode: 'on', min_prefill: 0}
    python benchmarks/planner_phase_bench.py --url http://127.0.0.1:8000 --name planner

or let it start each layout in turn (`--serve`: planner, 1P+1D, 2 aggregated) and print the table:

    python benchmarks/planner_phase_bench.py --serve --model random:llama-3.1-8b

The flip itself (drain included) is read from the server's `tandem_planner_flip_seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import httpx

# The prefill pool may empty (min_prefill 0), so phase 2 can become 2 workers that prefill
# themselves. The mode is set here, not by --planner: that flag would replace this YAML section.
PLANNER_YAML = "planner: {mode: 'on', min_prefill: 0, min_decode: 1}\n"

LAYOUTS = {
    "planner": ["--num-prefill", "1", "--num-decode", "1"],   # mode and pools in PLANNER_YAML
    "1P+1D": ["--num-prefill", "1", "--num-decode", "1"],
    "2 agg": ["--num-prefill", "0", "--num-decode", "2"],
}


def phase_args(args: argparse.Namespace, phase: int) -> list[str]:
    input_len, output_len = ((args.long_input, args.short_output) if phase == 1
                             else (args.short_input, args.long_output))
    rate = args.rate_1 if phase == 1 else args.rate_2
    return ["--dataset", "random", "--input-len", str(input_len), "--output-len", str(output_len),
            "--request-rate", str(rate), "--num-requests", str(int(rate * args.phase_s)),
            "--seed", str(phase), "--slo", f"ttft_ms={args.ttft_ms}", f"itl_ms={args.itl_ms}"]


def run_phases(url: str, args: argparse.Namespace, workdir: str) -> list[dict]:
    summaries = []
    for phase in (1, 2):
        out = os.path.join(workdir, f"phase{phase}.json")
        subprocess.run([sys.executable, "-m", "tandem.bench", "--url", url, "--no-progress",
                        "--out", out, *phase_args(args, phase)], check=True)
        with open(out) as f:
            summaries.append(json.load(f))
    return summaries


def attainment(summaries: list[dict]) -> float:
    """Requests meeting the SLO over requests sent, across the phases."""
    good = sent = 0.0
    for s in summaries:
        ok = s["num_requests"] - s["num_errors"]
        if s["request_throughput"] > 0:
            good += s["goodput"] / s["request_throughput"] * ok
        sent += s["num_requests"]
    return good / sent if sent else 0.0


def flip_seconds(url: str) -> str:
    text = httpx.get(url + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("tandem_planner_flip_seconds")]
    return "; ".join(lines) or "no flip"


def serve(args: argparse.Namespace, layout: list[str], workdir: str, with_planner: bool
          ) -> subprocess.Popen:
    config = os.path.join(workdir, "serve.yaml")
    with open(config, "w") as f:
        f.write(PLANNER_YAML if with_planner else "{}\n")
    command = ["tandem", "serve", "--config", config, "--model", args.model, "--slo", f"ttft_ms={args.ttft_ms}",
               f"itl_ms={args.itl_ms}", "--gpu-budget", "2", "--planner-interval-s",
               str(args.interval_s), "--http-port", str(args.port), *layout]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"tandem serve exited with {process.returncode}")
        time.sleep(2)
    process.terminate()
    raise SystemExit("tandem serve did not become healthy in 15 minutes")


def report(name: str, summaries: list[dict], url: str) -> None:
    p1, p2 = summaries
    print(f"{name:8s} attainment {attainment(summaries):6.1%} | phase 1 TTFT p90 "
          f"{p1['ttft_ms']['p90']} ms | phase 2 ITL p90 {p2['itl_ms']['p90']} ms | "
          f"{flip_seconds(url)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--name", default="server")
    parser.add_argument("--serve", action="store_true", help="start each layout in turn")
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--interval-s", type=float, default=10.0)
    parser.add_argument("--phase-s", type=float, default=300.0, help="length of each phase")
    parser.add_argument("--long-input", type=int, default=8192)
    parser.add_argument("--short-output", type=int, default=32)
    parser.add_argument("--short-input", type=int, default=256)
    parser.add_argument("--long-output", type=int, default=1024)
    parser.add_argument("--rate-1", type=float, default=6.0, help="phase 1 requests/s")
    parser.add_argument("--rate-2", type=float, default=6.0, help="phase 2 requests/s")
    parser.add_argument("--ttft-ms", type=float, default=500.0)
    parser.add_argument("--itl-ms", type=float, default=40.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        if not args.serve:
            report(args.name, run_phases(args.url, args, workdir), args.url)
            return 0
        url = f"http://127.0.0.1:{args.port}"
        for name, layout in LAYOUTS.items():
            process = serve(args, layout, workdir, with_planner=name == "planner")
            try:
                report(name, run_phases(url, args, workdir), url)
            finally:
                process.terminate()
                process.wait(timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
