"""KV pull bandwidth: NIXL READ between two worker processes, next to a copy of the same bytes.

Two processes each hold a KV tensor
`[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`, as workers do. The reader pulls
one prompt's blocks from the owner with `NixlKVAgent.start_read` and spins on `poll` until DONE,
for prompts of several lengths and two block patterns:

- `runs`: consecutive ids on both sides, so the whole prompt is one descriptor (the best case);
- `scattered`: every other block on the owner, so each block is its own descriptor (the worst case
  a fragmented cache gives).

The baseline is the hardware path for the same bytes: a torch peer copy cuda:0 -> cuda:1 on GPU
(the owner runs on cuda:0, the reader on cuda:1 when there are two GPUs), a one-thread torch copy
between two host buffers on CPU (a memcpy: UCX moves host bytes with one thread too, and a
multi-threaded copy on a small shared machine measures the scheduler more than memory). GB/s is
1e9 bytes per second of wall time, median over the timed iterations; the READ's time includes
building its descriptors. The defaults are Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128,
16-token blocks, bf16, which is 2 MiB per block.

    python benchmarks/kv_transfer_bench.py --device cpu --num-layers 2 --iters 5
    python benchmarks/kv_transfer_bench.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import queue
import statistics
import time
from dataclasses import dataclass

import torch

from tandem.kv_transfer import KVRegion, NixlKVAgent

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PATTERNS = ("runs", "scattered")
# Owner fills block i with the byte i % FILL_MODULUS, so the reader can check what landed where.
FILL_MODULUS = 251


@dataclass(frozen=True)
class Plan:
    device: str
    shape: tuple[int, ...]
    dtype_name: str
    prompt_tokens: tuple[int, ...]
    block_size: int
    patterns: tuple[str, ...]
    warmup: int
    iters: int
    reader_progress_thread: bool = False  # True: as a worker the planner may flip (launcher/worker.py)


@dataclass(frozen=True)
class Row:
    prompt_tokens: int
    pattern: str
    num_blocks: int
    num_descriptors: int
    nbytes: int
    median_s: float
    best_s: float


def block_ids(pattern: str, num_blocks: int) -> tuple[list[int], list[int]]:
    """(owner ids, reader ids) for one prompt of num_blocks blocks."""
    if pattern == "runs":
        return list(range(num_blocks)), list(range(num_blocks))
    return list(range(0, 2 * num_blocks, 2)), list(range(num_blocks))


def owner_device(plan: Plan) -> torch.device:
    return torch.device("cuda:0") if plan.device == "cuda" else torch.device("cpu")


def reader_device(plan: Plan) -> torch.device:
    if plan.device != "cuda":
        return torch.device("cpu")
    return torch.device("cuda:1" if torch.cuda.device_count() > 1 else "cuda:0")


def run_owner(plan: Plan, to_reader: mp.Queue, from_reader: mp.Queue, results: mp.Queue) -> None:
    kv_cache = torch.empty(plan.shape, dtype=DTYPES[plan.dtype_name], device=owner_device(plan))
    fill = torch.arange(plan.shape[0], device=kv_cache.device) % FILL_MODULUS
    kv_cache.view(torch.uint8).view(plan.shape[0], -1)[:] = fill.to(torch.uint8)[:, None]
    agent = NixlKVAgent("bench-owner", kv_cache)
    to_reader.put((agent.metadata(), agent.region.to_bytes()))
    num_notifications = 0
    while from_reader.empty():  # drain notifications as a prefill worker would, until told to stop
        num_notifications += len(agent.get_notifications())
        time.sleep(0.001)
    num_notifications += len(agent.get_notifications())
    results.put(("owner", num_notifications))
    agent.close()


def run_reader(plan: Plan, from_owner: mp.Queue, to_owner: mp.Queue, results: mp.Queue) -> None:
    kv_cache = torch.zeros(plan.shape, dtype=DTYPES[plan.dtype_name], device=reader_device(plan))
    agent = NixlKVAgent("bench-reader", kv_cache,  # as decode workers, unless flips are allowed
                        progress_thread=plan.reader_progress_thread)
    metadata, region_bytes = from_owner.get(timeout=120)
    agent.add_peer("bench-owner", metadata, KVRegion.from_bytes(region_bytes))
    rows, num_reads = [], 0
    for tokens in plan.prompt_tokens:
        for pattern in plan.patterns:
            num_blocks = math.ceil(tokens / plan.block_size)
            src, dst = block_ids(pattern, num_blocks)
            times, num_descriptors = [], 0
            for i in range(plan.warmup + plan.iters):
                elapsed_s, num_descriptors = timed_read(agent, src, dst, f"bench-{num_reads}")
                num_reads += 1
                if i >= plan.warmup:
                    times.append(elapsed_s)
            check_landed(kv_cache, src, dst)
            nbytes = num_blocks * agent.region.block_nbytes
            rows.append(Row(tokens, pattern, num_blocks, num_descriptors, nbytes,
                            statistics.median(times), min(times)))
    results.put(("reader", rows, num_reads))
    agent.close()
    to_owner.put("stop")


def timed_read(
    agent: NixlKVAgent, src: list[int], dst: list[int], request_id: str
) -> tuple[float, int]:
    t0 = time.perf_counter()
    handle = agent.start_read("bench-owner", src, dst, request_id.encode())
    state = "PROC" if handle.finished_s is None else "DONE"
    while state == "PROC":
        state = agent.poll(handle)
    elapsed_s = time.perf_counter() - t0
    agent.release(handle)
    if state != "DONE":
        raise RuntimeError(f"{request_id}: the READ failed")
    return elapsed_s, handle.num_descriptors


def check_landed(kv_cache: torch.Tensor, src: list[int], dst: list[int]) -> None:
    blocks = kv_cache.view(torch.uint8).view(kv_cache.shape[0], -1)  # (num_blocks, block_nbytes)
    expected = (torch.tensor(src, device=kv_cache.device) % FILL_MODULUS).to(torch.uint8)
    if not torch.equal(blocks[dst], expected[:, None].expand(-1, blocks.shape[1])):
        raise RuntimeError("the blocks read do not hold the owner's bytes")


def copy_baseline_s(plan: Plan, nbytes: int) -> float:
    """Median seconds of one torch copy of nbytes from the owner's device to the reader's."""
    torch.set_num_threads(1)
    src = torch.empty(nbytes, dtype=torch.uint8, device=owner_device(plan))
    dst = torch.empty(nbytes, dtype=torch.uint8, device=reader_device(plan))
    times = []
    for i in range(plan.warmup + plan.iters):
        if plan.device == "cuda":
            torch.cuda.synchronize(src.device)
            torch.cuda.synchronize(dst.device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if plan.device == "cuda":
            torch.cuda.synchronize(dst.device)
            torch.cuda.synchronize(src.device)
        if i >= plan.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_pair(plan: Plan) -> tuple[list[Row], int, int]:
    ctx = mp.get_context("spawn")
    owner_to_reader, reader_to_owner, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    owner = ctx.Process(target=run_owner, args=(plan, owner_to_reader, reader_to_owner, results))
    reader = ctx.Process(target=run_reader, args=(plan, owner_to_reader, reader_to_owner, results))
    owner.start()
    reader.start()
    received: dict[str, tuple] = {}
    while len(received) < 2:
        try:
            role, *payload = results.get(timeout=1.0)
            received[role] = tuple(payload)
        except queue.Empty:
            failed = [p for p in (owner, reader) if p.exitcode not in (None, 0)]
            if failed:
                for p in (owner, reader):
                    p.kill()
                raise SystemExit(f"a benchmark process failed (exit code {failed[0].exitcode})")
    owner.join()
    reader.join()
    rows, num_reads = received["reader"]
    return rows, num_reads, received["owner"][0]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--num-layers", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--patterns", choices=PATTERNS, nargs="+", default=list(PATTERNS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reader-progress-thread", action="store_true",
                   help="the reader runs NIXL's progress thread, as a flippable worker does")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    max_blocks = math.ceil(max(args.prompt_tokens) / args.block_size)
    # Twice the largest prompt, so that the scattered pattern fits.
    shape = (2 * max_blocks, args.num_layers, 2, args.block_size, args.num_kv_heads, args.head_dim)
    plan = Plan(args.device, shape, args.dtype, tuple(args.prompt_tokens), args.block_size,
                tuple(args.patterns), args.warmup, args.iters, args.reader_progress_thread)
    block_nbytes = math.prod(shape[1:]) * DTYPES[args.dtype].itemsize
    print(f"KV block: {shape[1:]} {args.dtype} = {block_nbytes / 2**20:.3f} MiB; "
          f"cache of {shape[0]} blocks per process; owner {owner_device(plan)}, "
          f"reader {reader_device(plan)}; median of {args.iters} after {args.warmup} warm-up")
    rows, num_reads, num_notifications = run_pair(plan)
    baseline_name = "torch peer copy" if args.device == "cuda" else "torch host copy"
    print(f"| tokens | pattern | blocks | descriptors | MiB | NIXL READ ms | NIXL GB/s "
          f"| {baseline_name} GB/s | NIXL / copy |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        nixl_gbps = row.nbytes / row.median_s / 1e9
        copy_gbps = row.nbytes / copy_baseline_s(plan, row.nbytes) / 1e9
        print(f"| {row.prompt_tokens} | {row.pattern} | {row.num_blocks} | {row.num_descriptors} "
              f"| {row.nbytes / 2**20:.0f} | {row.median_s * 1e3:.2f} | {nixl_gbps:.2f} "
              f"| {copy_gbps:.2f} | {nixl_gbps / copy_gbps:.2f} |")
    print(f"notifications received by the owner: {num_notifications} of {num_reads} reads")


if __name__ == "__main__":
    main()
