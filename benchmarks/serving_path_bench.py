"""What the serving path costs per streamed token: CPU per output token of the frontend, each
worker and the benchmark client, and the output tokens/s they deliver together.

    python benchmarks/serving_path_bench.py --serve "--num-prefill 0 --num-decode 2" \
        --backends openai,grpc --input-len 256 --output-len 1024 --request-rate 28.75 \
        --num-requests 575 [--out runs/serving_path.json]

One server is started with the `--serve` flags (on the GPUs unless they say `--device cpu`), a
short warm-up runs, then `tandem bench` once per backend. CPU is utime + stime from
/proc/PID/stat over the bench's run, for the server's main process (the frontend), each worker
process and the bench process (its whole life, start-up included: the start-up alone is printed
once from a one-request run). A frontend near 1,000,000 us of CPU per second of wall is the
serving path's ceiling, not the GPUs'.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests.serving_harness

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def run_bench(server, backend: str, extra: list[str], out: Path | None = None) -> dict:
    """One `tandem bench` run; its CPU by process, its wall time and (with `out`) its summary."""
    from tests.serving_harness import worker_pids

    url = server.http_url if backend.startswith("openai") else server.grpc_address
    command = [sys.executable, "-m", "tandem.launcher.cli", "bench", "--backend", backend,
               "--url", url, "--temperature", "0", "--no-progress", *extra]
    if out is not None:
        command += ["--out", str(out)]
    pids = {"frontend": server.process.pid}
    pids.update({f"worker {pid}": pid for pid in worker_pids(server)})
    before = {name: cpu_s(pid) for name, pid in pids.items()}
    started = time.monotonic()
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    usage_before = os.times()
    output, _ = client.communicate(timeout=900)
    usage = os.times()
    wall_s = time.monotonic() - started
    if client.returncode != 0:
        raise RuntimeError(f"tandem bench failed:\n{output[-3000:]}")
    cpu = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
    cpu["client"] = ((usage.children_user + usage.children_system)
                     - (usage_before.children_user + usage_before.children_system))
    summary = json.loads(out.read_text()) if out is not None else None
    return {"summary": summary, "wall_s": wall_s, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", default="--num-prefill 0 --num-decode 2",
                        help="flags of tandem serve, as one string")
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--backends", default="openai,grpc")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=1024)
    parser.add_argument("--request-rate", type=float, default=28.75)
    parser.add_argument("--num-requests", type=int, default=575)
    parser.add_argument("--max-concurrency", type=int, default=0, help="0: unbounded")
    parser.add_argument("--slo", nargs="+", default=[], metavar="NAME=MS",
                        help="as tandem bench's: adds each run's share of requests within it")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--server-log", type=Path,
                        help="write the server's output here, logged at INFO (its stall and "
                             "slow-gap lines included)")
    args = parser.parse_args()

    from tests.serving_harness import start_server

    workload = ["--dataset", "random", "--input-len", str(args.input_len), "--output-len",
                str(args.output_len), "--range-ratio", "0", "--request-rate",
                str(args.request_rate), "--num-requests", str(args.num_requests)]
    if args.max_concurrency:
        workload += ["--max-concurrency", str(args.max_concurrency)]
    if args.slo:
        workload += ["--slo", *args.slo]
    server = start_server("--model", args.model, *shlex.split(args.serve), timeout_s=600.0,
                          log_level="INFO" if args.server_log else "WARNING")
    rows = []
    try:
        short = ["--dataset", "random", "--input-len", str(args.input_len)]
        startup = run_bench(server, "grpc", [*short, "--output-len", "1", "--num-requests", "1"])
        run_bench(server, args.backends.split(",")[0],
                  [*short, "--output-len", "16", "--num-requests", "32", "--max-concurrency", "8"])
        for backend in args.backends.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                result = run_bench(server, backend, workload, Path(tmp) / "bench.json")
            summary = result["summary"]
            tokens = summary["total_output_tokens"]
            row = {"backend": backend, "wall_s": round(result["wall_s"], 1),
                   "output_tokens": tokens,
                   "output_tok_per_s": round(summary["output_token_throughput"], 1),
                   "tpot_p50_ms": round(summary["tpot_ms"]["p50"], 2),
                   "ttft_p50_ms": round(summary["ttft_ms"]["p50"], 1),
                   "ttft_p90_ms": round(summary["ttft_ms"]["p90"], 1),
                   "errors": summary["num_errors"],
                   "within_slo": (round(summary["goodput"] * summary["duration_s"]
                                        / max(summary["num_requests"], 1), 3)
                                  if args.slo else None),
                   "cpu_us_per_token": {name: round(1e6 * s / max(tokens, 1), 1)
                                        for name, s in result["cpu_s"].items()},
                   "cpu_share_of_wall": {name: round(s / result["wall_s"], 2)
                                         for name, s in result["cpu_s"].items()},
                   "client_streaming_us_per_token": round(
                       1e6 * (result["cpu_s"]["client"] - startup["cpu_s"]["client"])
                       / max(tokens, 1), 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
        if args.server_log:
            args.server_log.write_text("".join(server.lines))
    print(f"client start-up (one 1-token request, whole process): "
          f"{startup['cpu_s']['client']:.2f} s of CPU")
    print("| backend | output tok/s | TPOT p50 ms | TTFT p50 / p90 ms | errors | within SLO | "
          "CPU us/token: frontend | workers | client (less start-up) | frontend CPU / wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        us = row["cpu_us_per_token"]
        workers = " / ".join(f"{v}" for k, v in us.items() if k.startswith("worker"))
        print(f"| {row['backend']} | {row['output_tok_per_s']} | {row['tpot_p50_ms']} | "
              f"{row['ttft_p50_ms']} / {row['ttft_p90_ms']} | {row['errors']} | "
              f"{row['within_slo']} | {us['frontend']} | {workers} | {us['client']} "
              f"({row['client_streaming_us_per_token']}) | "
              f"{row['cpu_share_of_wall']['frontend']} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                 for k, v in vars(args).items()},
                                        "rows": rows, "client_startup_cpu_s":
                                        startup["cpu_s"]["client"]}, indent=1))


if __name__ == "__main__":
    main()
