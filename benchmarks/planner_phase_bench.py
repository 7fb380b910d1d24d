"""A workload that changes phase, served by the planner against the two static layouts (2x H200).

Phase 1: long prompts, short outputs (prefill-heavy: 1 prefill + 1 decode is the better layout);
phase 2: short prompts, long outputs (decode-heavy: 2 aggregated workers are). Phase 2's prompts
are shorter than the router's remote-prefill threshold, so its decode workers prefill them and the
planner (layout disagg, min_prefill 0) can empty the prefill pool: with the shipped H200 profile it
asks for 0 prefill + 1 decode at 6 req/s (the prefill worker is removed) and for 0 + 2 from about
15 req/s (the prefill worker flips to decode); in phase 1 it keeps 1 + 1 (the budget binds). Each layout serves
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

The flip itself (drain included) is read from the server's `tandem_planner_flip_seconds`, and the
planner's actions from its log (the server's output goes to `--log-dir`). A small run on a CPU, to
check the whole path before renting GPUs (random:tiny, a shipped CPU profile, seconds-long phases):

    python benchmarks/planner_phase_bench.py --serve --model random:tiny --device cpu \
        --phase-s 30 --long-input 512 --short-output 4 --short-input 32 --long-output 64 \
        --rate-1 1 --rate-2 1 --ttft-ms 5000 --itl-ms 1000 --interval-s 2 --hold-s 6 \
        --cooldown-s 4 --out phase.json
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
PLANNER_YAML = "planner: {mode: 'on', min_prefill: 0, min_decode: 1%s}\n"

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


def serve_command(args: argparse.Namespace, layout: list[str], config: str) -> list[str]:
    # INFO: the planner logs each action it applies, which planner_actions reads back.
    return [sys.executable, "-m", "tandem.launcher.cli", "--log-level", "INFO", "serve",
            "--config", config,
            "--model", args.model, "--device", args.device,
            "--slo", f"ttft_ms={args.ttft_ms}", f"itl_ms={args.itl_ms}", "--gpu-budget", "2",
            "--planner-interval-s", str(args.interval_s), "--http-port", str(args.port),
            *layout, *args.serve_arg]


def serve(args: argparse.Namespace, name: str, layout: list[str], workdir: str,
          with_planner: bool) -> subprocess.Popen:
    config = os.path.join(workdir, "serve.yaml")
    with open(config, "w") as f:
        f.write(planner_yaml(args) if with_planner else "{}\n")
    log = open(os.path.join(args.log_dir, f"serve-{_slug(name)}.log"), "w")
    process = subprocess.Popen(serve_command(args, layout, config), stdout=log,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.start_timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"tandem serve exited with {process.returncode} (log: {log.name})")
        time.sleep(2)
    process.terminate()
    raise SystemExit(f"tandem serve was not healthy after {args.start_timeout_s:.0f} s "
                     f"(log: {log.name})")


def planner_yaml(args: argparse.Namespace) -> str:
    """The planner's section: its pools, and the hold and cooldown when given (short phases)."""
    knobs = "".join(f", {name}: {value}" for name, value in
                    (("hold_s", args.hold_s), ("cooldown_s", args.cooldown_s)) if value is not None)
    return PLANNER_YAML % knobs


def planner_actions(log_path: str) -> list[str]:
    """The planner's applied actions, as its log states them (flips, adds, removals)."""
    with open(log_path, errors="replace") as f:
        return [line.strip() for line in f if "planner: flipped" in line
                or "planner: started" in line or "planner: removed" in line]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def report(name: str, summaries: list[dict], url: str) -> dict:
    p1, p2 = summaries
    row = {"layout": name, "attainment": attainment(summaries),
           "phase_1": {k: p1[k] for k in ("num_requests", "num_errors", "ttft_ms", "itl_ms")},
           "phase_2": {k: p2[k] for k in ("num_requests", "num_errors", "ttft_ms", "itl_ms")},
           "flip_seconds": flip_seconds(url)}
    print(f"{name:8s} attainment {row['attainment']:6.1%} | phase 1 TTFT p90 "
          f"{p1['ttft_ms']['p90']} ms | phase 2 ITL p90 {p2['itl_ms']['p90']} ms | "
          f"{row['flip_seconds']}", flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--name", default="server")
    parser.add_argument("--serve", action="store_true", help="start each layout in turn")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"with --serve: which of {', '.join(LAYOUTS)}, comma-separated")
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--device", default="auto", help="tandem serve --device")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for tandem serve (repeatable), e.g. "
                             "--serve-arg=--num-kv-blocks --serve-arg=4096")
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--log-dir", default=".", help="where each server's output goes")
    parser.add_argument("--out", default=None, help="write the table as JSON")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--interval-s", type=float, default=10.0)
    parser.add_argument("--hold-s", type=float, default=None,
                        help="the planner's hold before a scale-down (default: its own, 180 s)")
    parser.add_argument("--cooldown-s", type=float, default=None)
    parser.add_argument("--phase-s", type=float, default=300.0, help="length of each phase")
    parser.add_argument("--long-input", type=int, default=8192)
    parser.add_argument("--short-output", type=int, default=32)
    parser.add_argument("--short-input", type=int, default=128,
                        help="below the router's remote-prefill threshold (256), so phase 2 "
                             "needs no prefill pool")
    parser.add_argument("--long-output", type=int, default=1024)
    parser.add_argument("--rate-1", type=float, default=6.0, help="phase 1 requests/s")
    parser.add_argument("--rate-2", type=float, default=6.0, help="phase 2 requests/s")
    parser.add_argument("--ttft-ms", type=float, default=500.0)
    parser.add_argument("--itl-ms", type=float, default=40.0)
    args = parser.parse_args(argv)
    unknown = set(args.layouts.split(",")) - set(LAYOUTS)
    if unknown:
        parser.error(f"unknown layouts {sorted(unknown)}; choose from {list(LAYOUTS)}")
    return args


def serve_each(args: argparse.Namespace, workdir: str) -> list[dict]:
    url, rows = f"http://127.0.0.1:{args.port}", []
    for name in args.layouts.split(","):
        process = serve(args, name, LAYOUTS[name], workdir, with_planner=name == "planner")
        try:
            rows.append(report(name, run_phases(url, args, workdir), url))
        finally:
            process.terminate()
            process.wait(timeout=120)
        log_path = os.path.join(args.log_dir, f"serve-{_slug(name)}.log")
        rows[-1]["planner_actions"] = planner_actions(log_path)
        for line in rows[-1]["planner_actions"]:
            print(f"    {line}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        if args.serve:
            rows = serve_each(args, workdir)
        else:
            rows = [report(args.name, run_phases(args.url, args, workdir), args.url)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
