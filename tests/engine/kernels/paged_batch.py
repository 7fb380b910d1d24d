"""Random paged batches for the kernel tests and benchmark: a multi-layer KV cache filled with
random values, one layer's strided view, shuffled block tables and the matching metadata.

Blocks are drawn in random order from a pool with spare blocks, so a kernel that reads the wrong
block, assumes contiguous blocks or a contiguous layer view gets a visibly wrong answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tandem.engine.attention import AttentionMetadata


@dataclass(slots=True)
class PagedBatch:
    query: torch.Tensor     # (num_tokens, num_heads, head_dim), a strided view into a QKV tensor
    kv_layer: torch.Tensor  # (num_blocks, 2, block_size, num_kv_heads, head_dim), not contiguous
    meta: AttentionMetadata


def make_paged_batch(seq_lens: list[int], query_lens: list[int], num_heads: int,
                     num_kv_heads: int, head_dim: int, block_size: int = 16,
                     dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                     num_layers: int = 3, spare_blocks: int = 7) -> PagedBatch:
    """One sequence per entry: seq_lens[i] tokens of context, of which the last query_lens[i] are
    new this step (their K/V already sit in the cache, as after store_kv)."""
    assert all(0 < q <= s for q, s in zip(query_lens, seq_lens))
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    cache = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim,
                        dtype=dtype, device=device)
    kv_layer = cache[:, num_layers // 2]
    block_ids = torch.randperm(num_blocks).tolist()
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor(block_ids[:n], dtype=torch.int32)
        block_ids = block_ids[n:]

    query_start_loc = [0]
    slots = []
    for i, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        query_start_loc.append(query_start_loc[-1] + query_len)
        for pos in range(seq_len - query_len, seq_len):
            slots.append(int(block_tables[i, pos // block_size]) * block_size + pos % block_size)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=list(seq_lens),
    )
    num_tokens = query_start_loc[-1]
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype,
                      device=device)
    return PagedBatch(query=qkv[:, :num_heads], kv_layer=kv_layer, meta=meta)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32; NaN when out holds a NaN (an unwritten poisoned row)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()
