"""The serving path's fixed cost per request: a short prompt's time to first token on an idle
worker, through each way in, against the engine alone.

    python benchmarks/serving_latency_bench.py [--model random:tiny] [--device cpu]
        [--prompt-tokens 225] [--num-requests 20] [--gap-s 0.3]

Each figure is the median over requests sent one at a time, `--gap-s` apart, every prompt new to
the prefix cache:
- engine, back to back: `LLM.generate` of the prompt for one token, in this process, with no gap
  (the way `tandem profile` times its steps; on a CPU with the torch threads `tandem serve` gives
  its one worker);
- engine: the same, `--gap-s` apart: what a step costs a device (and host) that was idle;
- worker: the decode worker's own Generate RPC, called straight, no frontend;
- grpc: the frontend's gRPC API (`tandem bench --backend grpc`);
- openai: the OpenAI HTTP API with streaming (`tandem bench --backend openai`), the way real runs
  are measured.
(The two `tandem bench` ways send Poisson arrivals at one per `--gap-s`, one request in flight, so
their gaps are `--gap-s` on average.)
`tandem serve` runs one decode worker and no prefill worker, so each prompt is prefilled where it
decodes. What each way adds to the engine at the same gap is what the simulator's fixed
per-request latency (`tandem simulate --frontend-overhead-ms`, plus `rpc_s`) stands for; what the
idle engine adds to the back-to-back one is a cost the profile does not see.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests.serving_harness


def prompt(i: int, num_tokens: int) -> list[int]:
    """Prompt i: the same length every time, its first two tokens unique to i (below 1500**2) so
    no prefix is cached; every id is inside the smallest vocabulary (random:tiny's 2048)."""
    return [20 + i % 1500, 20 + i // 1500] + [(17 + 31 * k) % 900 + 20
                                              for k in range(num_tokens - 2)]


def engine_alone(model: str, device: str, num_tokens: int, num_requests: int,
                 gaps_s: tuple[float, ...], threads: int | None) -> list[list[float]]:
    """Seconds per prompt, for each gap between prompts, on one engine."""
    import torch

    from tandem import LLM
    from tandem.contracts.sampling_params import SamplingParams

    if threads:
        torch.set_num_threads(threads)
    llm = LLM(model=model, device=device)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    out = []
    for n, gap_s in enumerate(gaps_s):
        times = []
        for i in range(num_requests + 2):  # two to warm up
            time.sleep(gap_s)
            start = time.perf_counter()
            llm.generate([prompt(n * 1000 + i, num_tokens)], params)
            times.append(time.perf_counter() - start)
        out.append(times[2:])
    del llm
    gc.collect()  # the engine's weights and KV cache go before the server's worker takes the GPU
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


async def worker_direct(address: str, num_tokens: int, num_requests: int, gap_s: float
                        ) -> list[float]:
    from tandem.api.v1 import generation_pb2 as gpb
    from tandem.api.worker.v1 import worker_pb2 as wpb
    from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
    from tandem.worker.auth import internal_channel

    times = []
    async with internal_channel(address) as channel:
        stub = wgrpc.WorkerStub(channel)
        for i in range(num_requests + 2):
            await asyncio.sleep(gap_s)
            request = wpb.WorkerGenerateRequest(
                request_id=f"latency-{i}", prompt_token_ids=prompt(10_000 + i, num_tokens),
                sampling=gpb.SamplingOptions(max_tokens=2, temperature=0.0))
            start = time.perf_counter()
            async for _ in stub.Generate(request):
                times.append(time.perf_counter() - start)
                break
    return times[2:]


def bench_ttft_ms(server, backend: str, num_tokens: int, num_requests: int, gap_s: float,
                  seed: int) -> float:
    """TTFT p50 of `tandem bench`: one request at a time, about `gap_s` apart."""
    from benchmarks.serving_path_bench import run_bench

    workload = ["--dataset", "random", "--input-len", str(num_tokens), "--output-len", "2",
                "--num-requests", str(num_requests), "--request-rate", str(1.0 / gap_s),
                "--max-concurrency", "1", "--seed", str(seed)]
    with tempfile.TemporaryDirectory() as tmp:
        return run_bench(server, backend, workload, Path(tmp) / "bench.json"
                         )["summary"]["ttft_ms"]["p50"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=225)
    parser.add_argument("--num-requests", type=int, default=20)
    parser.add_argument("--gap-s", type=float, default=0.3)
    args = parser.parse_args()

    from tests.serving_harness import registered_workers, start_server

    # One worker on a CPU gets every core (launcher/serve.py); the engine alone gets the same.
    threads = os.cpu_count() if args.device == "cpu" else None
    back_to_back, engine = engine_alone(args.model, args.device, args.prompt_tokens,
                                        args.num_requests, (0.0, args.gap_s), threads)
    os.environ.setdefault("TANDEM_INTERNAL_SECRET", secrets.token_urlsafe(24))
    server = start_server("--model", args.model, "--device", args.device, "--num-prefill", "0",
                          "--num-decode", "1", timeout_s=600.0, log_level="INFO")
    try:
        address = next(a for role, a in registered_workers(server).values() if role == "decode")
        worker = asyncio.run(worker_direct(address, args.prompt_tokens, args.num_requests,
                                           args.gap_s))
        rows = {"engine, back to back": 1e3 * statistics.median(back_to_back),
                "engine": 1e3 * statistics.median(engine),
                "worker": 1e3 * statistics.median(worker),
                "grpc": bench_ttft_ms(server, "grpc", args.prompt_tokens, args.num_requests,
                                      args.gap_s, seed=1),
                "openai": bench_ttft_ms(server, "openai", args.prompt_tokens, args.num_requests,
                                        args.gap_s, seed=2)}
    finally:
        server.stop()
    print(f"{args.model} on {args.device}, {args.prompt_tokens}-token prompts, one at a time, "
          f"{args.gap_s} s apart (median of {args.num_requests}):")
    print("| way in | TTFT | over the engine |")
    print("| --- | --- | --- |")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} ms | {ms - rows['engine']:+.2f} ms |")


if __name__ == "__main__":
    main()
