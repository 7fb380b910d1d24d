"""KV-aware routing against round-robin and least-loaded, at equal offered load, on a CPU.

  python benchmarks/kv_routing_bench.py [--modes kv,round-robin,least-loaded] [--quick]

For each router mode: `tandem serve` with 4 decode workers (aggregated, `--num-prefill 0`) on
random:tiny with a KV cache of `--num-kv-blocks` blocks per worker, then `tandem bench` with the same
seeded requests and arrival times: the shared-prefix dataset, and a replay of the Mooncake
conversation trace scaled to 16-token blocks (its first --trace-requests requests, arrival times
x --trace-time-scale). The cache is sized so that one worker holds only a
few of the shared prefixes: a router that spreads a prefix over every worker makes each of them
evict it. Prints TTFT, prefix hit rate against the ideal (an infinite shared cache on the same
requests) and throughput, per mode and dataset; JSON summaries go to --out-dir.

On GPUs (one decode worker per GPU), with real prefill costs:

  python benchmarks/kv_routing_bench.py --device cuda --model random:qwen3-0.6b --datasets shared-prefix \
      --num-kv-blocks 1024 --system-prompt-len 4096 --request-rate 16 --modes kv:4,round-robin \
      --backend grpc
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from tests.serving_harness import start_server

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl"


def datasets(args: argparse.Namespace) -> dict[str, list[str]]:
    quick = args.quick
    shared = ["--dataset", "shared-prefix", "--num-groups", "8", "--prompts-per-group",
              str(args.prompts_per_group or (8 if quick else 16)), "--system-prompt-len",
              str(args.system_prompt_len), "--question-len", "32", "--output-len", "8",
              "--request-rate", str(args.request_rate)]
    sets = {"shared-prefix": shared}
    if TRACE.is_file():
        sets["trace"] = ["--dataset", f"trace:{TRACE}", "--trace-block-tokens", "16",
                         "--num-requests", "60" if quick else str(args.trace_requests),
                         "--output-scale", "0.02",
                         "--time-scale", str(args.trace_time_scale)]
    return sets


def run_mode(mode: str, sets: dict[str, list[str]], args: argparse.Namespace) -> dict:
    """`mode` is a router mode, or kv:W for kv with overlap weight W."""
    router_mode, _, weight = mode.partition(":")
    out_dir = Path(args.out_dir)
    server = start_server("--model", args.model, "--num-prefill", "0", "--num-decode",
                          str(args.num_decode), "--device", args.device,
                          "--num-kv-blocks", str(args.num_kv_blocks), "--router-mode", router_mode,
                          "--kv-overlap-weight", weight or "1.0",
                          "--max-num-batched-tokens", "1024")
    results = {}
    try:
        for name, args_for_set in sets.items():
            out = out_dir / f"{name}-{mode.replace(':', '-w')}.json"
            url = server.grpc_address if args.backend == "grpc" else server.http_url
            subprocess.run([sys.executable, "-m", "tandem.launcher.cli", "bench", "--backend", args.backend,
                            "--url", url, "--no-progress", "--seed", "0", "--out", str(out),
                            *args_for_set], check=True, stdout=subprocess.DEVNULL)
            results[name] = json.loads(out.read_text())
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="kv,kv:4,round-robin,least-loaded",
                        help="router modes; kv:W is kv with --kv-overlap-weight W")
    parser.add_argument("--num-kv-blocks", type=int, default=256, help="per worker")
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-decode", type=int, default=4)
    parser.add_argument("--system-prompt-len", type=int, default=1024)
    parser.add_argument("--prompts-per-group", type=int, default=None)
    parser.add_argument("--request-rate", type=float, default=4.0)
    parser.add_argument("--trace-time-scale", type=float, default=0.15,
                        help="trace arrival times are multiplied by this")
    parser.add_argument("--trace-requests", type=int, default=1500,
                        help="replay the trace's first N requests (more requests, more reuse: "
                             "27%% of the first 1500 requests' blocks can be reused, 16%% of the "
                             "first 500's)")
    parser.add_argument("--datasets", default="shared-prefix,trace",
                        help="which of shared-prefix and trace to run")
    parser.add_argument("--backend", choices=("openai", "grpc"), default="openai",
                        help="grpc for models whose tokens have no text (random presets with a "
                             "large vocab): it streams token ids")
    parser.add_argument("--out-dir", default="/tmp/kv_routing_bench")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    wanted = args.datasets.split(",")
    sets = {name: flags for name, flags in datasets(args).items() if name in wanted}
    table = {mode: run_mode(mode, sets, args) for mode in args.modes.split(",")}
    print("dataset | mode | requests | errors | TTFT p50 ms | TTFT p99 ms | prefix hit rate | "
          "ideal | of ideal | output tok/s")
    for name in sets:
        for mode, results in table.items():
            r = results[name]
            ideal = r.get("ideal_prefix_hit_rate") or 0.0
            share = r["prefix_hit_rate"] / ideal if ideal else 0.0
            print(f"{name} | {mode} | {r['num_requests']} | {r['num_errors']} | "
                  f"{r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p99']:.1f} | "
                  f"{r['prefix_hit_rate']:.3f} | {ideal:.3f} | {share:.0%} | "
                  f"{r['output_token_throughput']:.1f}")


if __name__ == "__main__":
    main()
