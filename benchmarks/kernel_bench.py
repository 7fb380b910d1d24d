"""Micro-benchmark of the engine's Triton kernels on Llama-3.1-8B attention shapes (32 query heads,
8 KV heads, head_dim 128, 16-token blocks, bf16), next to their hardware limits and a torch
baseline measured in the same run.

- decode attention, batch 1, contexts 1k/4k/16k: microseconds per call inside a CUDA graph (how the
  decode worker runs it) and achieved GB/s = KV bytes read / time, against the device-to-device
  copy rate measured here. Each replay walks several block tables over a cache larger than L2, so
  the figure is HBM, not cache. A small sweep of num_splits and tile configs shows the headroom.
- decode attention over batches (`--only batches`): batch 1-128 at 1k and 4k contexts, and batches
  with one 32k-token context among 1k ones (two 16k among 2k ones), the split count and tiles the
  engine chooses (choose_num_splits, choose_tiles) against other split counts and tiles, as KV
  bytes read over the copy rate.
- prefill attention, one 4k prompt (and a 4k chunk after a 4k cached prefix): TFLOP/s of the
  causal attention FLOPs, against torch SDPA (flash) on contiguous K/V and a bf16 matmul.
- fused residual RMSNorm and rotary: GB/s on a 4096-token batch.

Run from the repository root (it borrows the tests' batch builder):
    PYTHONPATH=. python benchmarks/kernel_bench.py [--only decode,batches,prefill,elementwise]
(needs a CUDA GPU and triton)
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from tandem.engine.kernels.decode_attention import (choose_num_splits, choose_tiles,
                                                    decode_attention)
from tandem.engine.kernels.prefill_attention import default_config, prefill_attention
from tandem.engine.kernels.rmsnorm import rms_norm
from tandem.engine.kernels.rotary import apply_rotary
from tandem.engine.layers import rope_cos_sin, rope_inv_freq

# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.hardware import copy_rate_gbs, matmul_tflops, median_us
from tests.engine.kernels.paged_batch import make_paged_batch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
L2_FLUSH_BYTES = 256 * 2**20  # several times an H100/H200 L2


def graph_time_us(steps: list, replays: int = 20) -> float:
    """Time per step of `steps` run back to back inside one CUDA graph."""
    for step in steps:
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for step in steps:
            step()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(steps))
    return sorted(times)[len(times) // 2]


def decode_steps(context: int, num_splits: int, config: tuple[int, int, int]) -> list:
    kv_bytes = 2 * context * NUM_KV_HEADS * HEAD_DIM * 2
    num_copies = max(4, math.ceil(L2_FLUSH_BYTES / kv_bytes))
    batch = make_paged_batch([context] * num_copies, [1] * num_copies, NUM_HEADS, NUM_KV_HEADS,
                             HEAD_DIM, num_layers=1, spare_blocks=0)
    meta, scale = batch.meta, HEAD_DIM ** -0.5
    steps = []
    for i in range(num_copies):  # one sequence of batch 1 per step, each with its own blocks
        query, out = batch.query[i:i + 1], torch.empty_like(batch.query[i:i + 1])
        steps.append(lambda q=query, o=out, i=i: decode_attention(
            q, batch.kv_layer, meta.block_tables[i:i + 1], meta.seq_lens[i:i + 1], scale, o,
            context, num_splits=num_splits, tiles=config))
    return steps


def bench_decode(copy_gbs: float) -> None:
    print(f"\ndecode attention, batch 1, {NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}, "
          f"bf16, CUDA graph")
    print(f"{'context':>8} {'splits':>6} {'block_n/warps/stages':>20} {'us':>8} {'GB/s':>7} "
          f"{'floor us':>8}")
    for context in (1024, 4096, 16384):
        kv_bytes = 2 * context * NUM_KV_HEADS * HEAD_DIM * 2
        auto = choose_num_splits(1, NUM_KV_HEADS, context, torch.device("cuda"))
        rows = [(auto, (64, 4, 2))]
        rows += [(s, (64, 4, 2)) for s in (8, 16, 32, 64, 96, 128) if s != auto]
        rows += [(auto, c) for c in ((64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3),
                                     (128, 8, 2))]
        for num_splits, config in rows:
            us = graph_time_us(decode_steps(context, num_splits, config))
            print(f"{context:>8} {num_splits:>6} {str(config):>20} {us:>8.1f} "
                  f"{kv_bytes / us / 1e3:>7.0f} {kv_bytes / copy_gbs / 1e3:>8.1f}")
        q = torch.randn(1, NUM_HEADS, 1, HEAD_DIM, dtype=DTYPE, device="cuda")
        k = torch.randn(1, NUM_KV_HEADS, context, HEAD_DIM, dtype=DTYPE, device="cuda")
        v = torch.randn_like(k)
        try:
            us = median_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            print(f"{context:>8} torch SDPA, contiguous K/V, no graph: {us:.1f} us, "
                  f"{kv_bytes / us / 1e3:.0f} GB/s")
        except RuntimeError as error:
            print(f"{context:>8} torch SDPA failed: {error}")


def bench_decode_batches(copy_gbs: float) -> None:
    """Batches of even contexts, and uneven ones (one 32k-token context among 1k ones), where
    the long context must be spread over more programs than the short ones to not set the time.
    A split count here is the most splits a sequence may take."""
    print(f"\ndecode attention over batches, {NUM_HEADS}/{NUM_KV_HEADS} heads, CUDA graph; "
          f"* = the engine's choice")
    print(f"{'batch':>5} {'contexts':>14} {'splits':>7} {'tiles':>14} {'us':>8} {'of copy':>8}")
    cases = [(n, [context] * n) for n in (1, 4, 8, 16, 32, 64, 128) for context in (1024, 4096)]
    cases += [(n, [32768] + [1024] * (n - 1)) for n in (8, 16, 32, 64, 128)]
    cases += [(n, [16384] * 2 + [2048] * (n - 2)) for n in (32, 128)]
    device = torch.device("cuda")
    for batch_size, contexts in cases:
        kv_bytes = sum(contexts) * 2 * NUM_KV_HEADS * HEAD_DIM * 2
        copies = max(1, math.ceil(L2_FLUSH_BYTES / kv_bytes))
        batch = make_paged_batch(contexts * copies, [1] * batch_size * copies, NUM_HEADS,
                                 NUM_KV_HEADS, HEAD_DIM, num_layers=1, spare_blocks=0)
        meta, out = batch.meta, torch.empty_like(batch.query)
        longest = max(contexts)
        chosen = choose_num_splits(batch_size, NUM_KV_HEADS, longest, device)
        tiles = choose_tiles(batch_size * NUM_KV_HEADS, chosen, device)
        rows = [(chosen, tiles)] + [
            (s, t) for s in (1, 2, 3, 4, 8, 16, 64) if longest // s >= 64
            for t in ((64, 4, 2), (64, 4, 3), (128, 4, 3))
            if (s, t) != (chosen, tiles) and (s == 1 or t != (128, 4, 3))]
        firsts = sum(c == contexts[0] for c in contexts)
        label = (f"{contexts[0]}" if firsts == batch_size
                 else f"{firsts}x{contexts[0]}+{batch_size - firsts}x{contexts[-1]}")
        for num_splits, config in rows:
            def call(i: int, num_splits=num_splits, config=config) -> None:
                rows_i = slice(i * batch_size, (i + 1) * batch_size)
                decode_attention(batch.query[rows_i], batch.kv_layer, meta.block_tables[rows_i],
                                 meta.seq_lens[rows_i], HEAD_DIM ** -0.5, out[rows_i], longest,
                                 num_splits=num_splits, tiles=config)
            us = graph_time_us([functools.partial(call, i) for i in range(copies)])
            mark = "*" if (num_splits, config) == (chosen, tiles) else " "
            print(f"{batch_size:>5} {label:>14} {num_splits:>6}{mark} {str(config):>14} "
                  f"{us:>8.1f} {kv_bytes / us / 1e3 / copy_gbs:>8.0%}")


def causal_flops(query_len: int, seq_len: int) -> float:
    prefix = seq_len - query_len
    pairs = query_len * prefix + query_len * (query_len + 1) / 2
    return 4 * NUM_HEADS * HEAD_DIM * pairs  # q @ k^T and p @ v, 2 FLOPs per multiply-add


def bench_prefill(mm_tflops: float) -> None:
    print(f"\nprefill attention, {NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}, bf16 "
          f"(matmul {mm_tflops:.0f} TFLOP/s)")
    configs = [None, (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3),
               (128, 64, 4, 4), (128, 32, 4, 4), (128, 128, 4, 2), (64, 64, 4, 3),
               (64, 64, 4, 4), (64, 32, 4, 3), (64, 128, 4, 2)]
    for query_len, seq_len in ((4096, 4096), (4096, 8192)):
        batch = make_paged_batch([seq_len], [query_len], NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                                 num_layers=1)
        out = torch.empty_like(batch.query)
        flops = causal_flops(query_len, seq_len)
        for config in configs:
            shown = config or default_config(HEAD_DIM, query_len)
            try:
                us = median_us(lambda: prefill_attention(batch.query, batch.kv_layer, batch.meta,
                                                         HEAD_DIM ** -0.5, out, config=config))
            except Exception as error:  # an over-sized config may not fit shared memory
                print(f"q {query_len} ctx {seq_len} {str(shown):>18} failed: {error}")
                continue
            label = "default" if config is None else ""
            print(f"q {query_len} ctx {seq_len} {str(shown):>18} {us:>9.1f} us "
                  f"{flops / us / 1e6:>6.0f} TFLOP/s {label}")
        q = torch.randn(1, NUM_HEADS, query_len, HEAD_DIM, dtype=DTYPE, device="cuda")
        k = torch.randn(1, NUM_KV_HEADS, query_len, HEAD_DIM, dtype=DTYPE, device="cuda")
        if seq_len == query_len:
            us = median_us(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                                  enable_gqa=True))
            print(f"q {query_len} ctx {seq_len} torch SDPA causal, contiguous: {us:.1f} us "
                  f"{flops / us / 1e6:.0f} TFLOP/s")


def bench_elementwise(copy_gbs: float) -> None:
    num_tokens, hidden = 4096, 4096
    x = torch.randn(num_tokens, hidden, dtype=DTYPE, device="cuda")
    residual, weight = torch.randn_like(x), torch.randn(hidden, dtype=DTYPE, device="cuda")
    us = median_us(lambda: rms_norm(x, weight, 1e-5, residual))
    print(f"\nrms_norm + residual {num_tokens}x{hidden}: {us:.1f} us, "
          f"{4 * x.numel() * 2 / us / 1e3:.0f} GB/s (copy {copy_gbs:.0f})")
    cos, sin = rope_cos_sin(rope_inv_freq(HEAD_DIM, 500000.0, None), 8192, "cuda")
    qkv = torch.randn(num_tokens, NUM_HEADS + 2 * NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE,
                      device="cuda")
    q, k = qkv[:, :NUM_HEADS], qkv[:, NUM_HEADS:NUM_HEADS + NUM_KV_HEADS]
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    us = median_us(lambda: apply_rotary(q, k, positions, cos, sin))
    moved = 2 * (q.numel() + k.numel()) * 2
    print(f"rotary q+k {num_tokens} tokens: {us:.1f} us, {moved / us / 1e3:.0f} GB/s")


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()}, triton {triton.__version__}, "
          f"torch {torch.__version__}")
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="decode,batches,prefill,elementwise")
    parts = parser.parse_args().only.split(",")
    copy_gbs = copy_rate_gbs()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    if "decode" in parts:
        bench_decode(copy_gbs)
    if "batches" in parts:
        bench_decode_batches(copy_gbs)
    if "prefill" in parts:
        bench_prefill(matmul_tflops())
    if "elementwise" in parts:
        bench_elementwise(copy_gbs)


if __name__ == "__main__":
    main()
