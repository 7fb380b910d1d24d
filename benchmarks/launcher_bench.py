"""Startup time and request latency through the ray launcher next to the local launcher.

  python benchmarks/launcher_bench.py [--launchers local,ray] [--num-requests 40] [--rounds 2]

For each launcher and round: `tandem serve` (1 prefill + 1 decode worker on random:tiny, on a
CPU unless --device says otherwise) timed from the command to its "tandem ready" line, then
`tandem bench` with the same seeded random requests (--input-len tokens in, --output-len out, one
at a time, so that latency is the server's and not a queue's), then SIGTERM. With `ray` and no
--ray-address, the server starts its own single-node Ray instance on 127.0.0.1, and that start is
part of its startup time. The data path (gRPC between frontend and workers, KV over NIXL) is the
same for both launchers, so TTFT and ITL should differ only by noise; startup pays for Ray.

Prints one markdown row per launcher and round; JSON summaries go to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from tests.serving_harness import start_server  # noqa: E402


def serve_args(args: argparse.Namespace, launcher: str) -> list[str]:
    serve = ["--device", args.device, "--num-prefill", "1", "--num-decode", "1",
             "--num-kv-blocks", "256", "--remote-prefill-min-tokens", "16",
             "--drain-timeout-s", "5", "--launcher", launcher]
    if launcher == "ray" and args.ray_address:
        serve += ["--ray-address", args.ray_address]
    return serve


def one_round(args: argparse.Namespace, launcher: str, out: Path) -> dict:
    started = time.monotonic()
    server = start_server(*serve_args(args, launcher), timeout_s=300)
    startup_s = time.monotonic() - started
    try:
        subprocess.run([sys.executable, "-m", "tandem.launcher.cli", "bench", "--url",
                        server.http_url, "--dataset", "random", "--num-requests",
                        str(args.num_requests), "--input-len", str(args.input_len),
                        "--output-len", str(args.output_len), "--range-ratio", "0",
                        "--max-concurrency", "1", "--seed", "1", "--no-progress",
                        "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    finally:
        server.stop()
    summary = json.loads(out.read_text())
    summary["startup_s"] = startup_s
    out.write_text(json.dumps(summary, indent=1))
    return summary


def row(launcher: str, round_index: int, r: dict) -> str:
    return (f"| {launcher} | {round_index} | {r['startup_s']:.1f} | {r['ttft_ms']['p50']:.1f} | "
            f"{r['ttft_ms']['p99']:.1f} | {r['itl_ms']['p50']:.2f} | {r['itl_ms']['p99']:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launchers", default="local,ray")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--out-dir", default="/tmp/launcher_bench")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| launcher | round | startup s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for round_index in range(1, args.rounds + 1):
        for launcher in args.launchers.split(","):
            summary = one_round(args, launcher, out_dir / f"{launcher}-{round_index}.json")
            print(row(launcher, round_index, summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
