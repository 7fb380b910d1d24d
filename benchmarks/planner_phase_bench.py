"""A workload that changes phase, served by the planner against the two static layouts (2x H200).

Phase 1: long prompts, short outputs (4096 / 32 tokens, 6 req/s: prefill-heavy, and 2048-token
chunks in aggregated steps break the every-gap ITL bound, so 1 prefill + 1 decode is the better
layout); phase 2: short prompts, long outputs (128 / 1024 tokens, 6 req/s: decode-heavy; with
`--max-num-seqs 32` in every layout one decode worker holds about 5 req/s and two about 10, so
2 aggregated workers are the better layout). Phase 2's prompts are below the router's
remote-prefill threshold, so decode workers prefill them and the planner (layout disagg,
min_prefill 0) can empty the prefill pool: with the shipped H200 profile it keeps 1 + 1 in phase
1 (the budget binds) and asks for 0 + 2 in phase 2, a flip of the prefill worker. Each layout
serves both phases back to back with `tandem bench` (random dataset, Poisson arrivals, after a
short unscored warm-up); the score is SLO attainment over the whole run (requests meeting the TTFT
and worst-gap ITL bounds over requests sent), which the planner must win by flipping a worker
between the phases. The simulator's view of the two static layouts, before renting GPUs:

    tandem simulate --profile planner/profiles/random-llama-3.1-8b-h200.json --num-prefill 1 \
        --num-decode 1 --max-num-seqs 32 --dataset random --input-len 128 --output-len 1024 \
        --request-rate 6 --num-requests 720 --slo ttft_ms=500 itl_ms=40 --out p2-1p1d.json

Against a server you started (one layout at a time):

    tandem serve --model random:llama-3.1-8b --num-prefill 1 --num-decode 1 --config p.yaml \
        --slo ttft_ms=500 itl_ms=40 --gpu-budget 2 --planner-interval-s 10
    # p.yaml: planner: {mode: 'on', min_prefill: 0}; add --max-num-seqs 32 as the bench does
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
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime

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


def warmup_args(args: argparse.Namespace, phase: int) -> list[str]:
    """A few requests of the phase's prompt length, short outputs, other prompts (seed)."""
    input_len = args.long_input if phase == 1 else args.short_input
    return ["--dataset", "random", "--input-len", str(input_len), "--output-len", "64",
            "--request-rate", "4", "--num-requests", str(args.warmup_requests),
            "--seed", str(100 + phase)]


def bench(url: str, flags: list[str], out: str) -> dict:
    subprocess.run([sys.executable, "-m", "tandem.bench", "--url", url, "--no-progress",
                    "--out", out, *flags], check=True)
    with open(out) as f:
        return json.load(f)


def run_phases(url: str, args: argparse.Namespace, workdir: str) -> list[dict]:
    if args.warmup_requests > 0:
        for phase in (1, 2):
            bench(url, warmup_args(args, phase), os.path.join(workdir, "warmup.json"))
    return [bench(url, [*phase_args(args, phase), "--save-requests"],
                  os.path.join(workdir, f"phase{phase}.json")) for phase in (1, 2)]


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
            "--max-num-seqs", str(args.max_num_seqs), *layout, *args.serve_arg]


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
                    (("hold_s", args.hold_s), ("cooldown_s", args.cooldown_s),
                     ("shape_window", args.shape_window)) if value is not None)
    return PLANNER_YAML % knobs


def planner_actions(log_path: str) -> list[str]:
    """The planner's applied actions, as its log states them (flips, adds, removals)."""
    with open(log_path, errors="replace") as f:
        return [line.strip() for line in f if "planner: flipped" in line
                or "planner: started" in line or "planner: removed" in line]


FLIP_LINE = re.compile(r"^(\S+ \S+) .*planner: flipped worker (\S+) from (\S+) to (\S+) in "
                       r"([\d.]+) s \(drain ([\d.]+) s, switch ([\d.]+) s\)")
AROUND_S = 30.0   # the clients' view compares this long before a flip with this long after it


def flips_from_log(log_path: str) -> list[dict]:
    """Each flip the server logged: its wall-clock end (the log line's time), total, drain, switch."""
    flips = []
    with open(log_path, errors="replace") as f:
        for line in f:
            match = FLIP_LINE.search(line)
            if match:
                end = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                flips.append({"worker": match[2], "from": match[3], "to": match[4],
                              "end_epoch_s": end, "total_s": float(match[5]),
                              "drain_s": float(match[6]), "switch_s": float(match[7])})
    return flips


def clients_around(flip: dict, summaries: list[dict], args: argparse.Namespace) -> dict:
    """What the clients saw: requests sent in the 30 s before the flip began, during it, and in
    the 30 s after it ended (count, failures, SLO attainment, TTFT and worst gap)."""
    start, end = flip["end_epoch_s"] - flip["total_s"], flip["end_epoch_s"]
    windows = {"before": (start - AROUND_S, start), "during": (start, end),
               "after": (end, end + AROUND_S)}
    sent = [(s["started_at_epoch_s"] + r["start_s"], r) for s in summaries
            for r in s["per_request"]]
    return {name: _window_stats([r for at, r in sent if low <= at < high], args)
            for name, (low, high) in windows.items()}


def _window_stats(records: list[dict], args: argparse.Namespace) -> dict:
    ok = [r for r in records if not r["error"]]
    worst_gaps = sorted(max(r["itl_ms"], default=0.0) for r in ok)
    ttfts = sorted(r["ttft_ms"] for r in ok)
    good = sum(1 for r in ok if r["ttft_ms"] <= args.ttft_ms
               and max(r["itl_ms"], default=0.0) <= args.itl_ms)
    return {"requests": len(records), "failed": len(records) - len(ok),
            "within_slo": good, "ttft_p50_ms": _pick(ttfts, 0.5), "ttft_p90_ms": _pick(ttfts, 0.9),
            "worst_gap_p50_ms": _pick(worst_gaps, 0.5)}


def _pick(values: list[float], q: float) -> float | None:
    return round(values[min(len(values) - 1, int(q * len(values)))], 1) if values else None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def report(name: str, summaries: list[dict], url: str) -> dict:
    p1, p2 = summaries
    keys = ("num_requests", "num_errors", "ttft_ms", "itl_ms", "tpot_ms")
    row = {"layout": name, "attainment": attainment(summaries),
           "phase_1": {"attainment": attainment([p1]), **{k: p1[k] for k in keys}},
           "phase_2": {"attainment": attainment([p2]), **{k: p2[k] for k in keys}},
           "flip_seconds": flip_seconds(url)}
    print(f"{name:8s} attainment {row['attainment']:6.1%} (phase 1 "
          f"{row['phase_1']['attainment']:6.1%}, phase 2 {row['phase_2']['attainment']:6.1%}) | "
          f"phase 1 TTFT p90 {p1['ttft_ms']['p90']} ms | phase 2 TTFT p90 {p2['ttft_ms']['p90']} "
          f"ms, ITL p90 {p2['itl_ms']['p90']} ms | {row['flip_seconds']}", flush=True)
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
    parser.add_argument("--interval-s", type=float, default=5.0)
    parser.add_argument("--hold-s", type=float, default=None,
                        help="the planner's hold before a scale-down (default: its own, 180 s)")
    parser.add_argument("--cooldown-s", type=float, default=None)
    parser.add_argument("--shape-window", type=int, default=2,
                        help="intervals the planner averages prompt lengths over: with 2 (10 s), "
                             "phase 1's long prompts leave its view ~10 s into phase 2")
    parser.add_argument("--phase-s", type=float, default=90.0, help="length of each phase")
    parser.add_argument("--max-num-seqs", type=int, default=32,
                        help="sequences a worker runs at once, in every layout: with 32, one "
                             "decode worker holds about 5 req/s of phase 2 and two hold 10")
    parser.add_argument("--warmup-requests", type=int, default=16,
                        help="per phase shape, sent before phase 1 and not scored (first-use "
                             "kernel compiles)")
    parser.add_argument("--long-input", type=int, default=4096)
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
            summaries = run_phases(url, args, workdir)
            rows.append(report(name, summaries, url))
        finally:
            process.terminate()
            process.wait(timeout=120)
        log_path = os.path.join(args.log_dir, f"serve-{_slug(name)}.log")
        rows[-1]["planner_actions"] = planner_actions(log_path)
        for line in rows[-1]["planner_actions"]:
            print(f"    {line}")
        rows[-1]["flips"] = flips_from_log(log_path)
        for flip in rows[-1]["flips"]:
            flip["clients"] = clients_around(flip, summaries, args)
            print(f"    flip {flip['from']} -> {flip['to']}: {flip['total_s']:.2f} s (drain "
                  f"{flip['drain_s']:.2f}, switch {flip['switch_s']:.3f}); clients: "
                  f"{json.dumps(flip['clients'])}")
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
