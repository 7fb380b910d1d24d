"""Paged attention over the block-major KV cache: metadata and the torch reference path.

The KV cache is one tensor per worker, `[num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim]` (DESIGN.md, "KV layout"); a layer sees the strided view `kv_cache[:, layer]` of shape
`[num_blocks, 2, block_size, num_kv_heads, head_dim]`. One step runs a flat batch of tokens from
several sequences: each sequence contributes `query_len` new tokens that sit at the end of its
`seq_len` tokens of context, so decode (query_len 1), a prompt chunk and a prompt with a cached
prefix are the same computation. The Triton kernels in `engine/kernels/` compute exactly this and are
tested against these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # (num_seqs + 1,) int32: prefix sums of query lengths
    seq_lens: torch.Tensor         # (num_seqs,) int32: context length including the new tokens
    block_tables: torch.Tensor     # (num_seqs, max_blocks_per_seq) int32, padded with 0
    slot_mapping: torch.Tensor     # (num_tokens,) int64: block_id * block_size + offset
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]  # host copies, so the reference path never syncs
    seq_lens_cpu: list[int]
    num_splits: int | None = None   # decode kernel's KV splits; fixed for a captured CUDA graph
    # The decode kernel's piece table (kernels/decode_pieces.py), made once at a captured step's
    # start; None: each decode kernel launch makes its own.
    pieces: object | None = None
    # A mixed step (prompt chunks beside decodes) puts its one-token sequences first: the first
    # num_decode_seqs go to the decode kernel, `rest` describes the others for the prefill kernel.
    num_decode_seqs: int = 0
    rest: AttentionMetadata | None = None
    # A mixed step's views of its query and output, decode rows and the rest, made at its first
    # layer and reused by the others (the same buffers every layer): kernels.paged_attention.
    mixed_views: tuple | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def store_kv_reference(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Write new K/V into the cache. key, value: (num_tokens, num_kv_heads, head_dim)."""
    block_size = kv_layer.shape[2]
    block_ids = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_layer[block_ids, 0, offsets] = key.to(kv_layer.dtype)
    kv_layer[block_ids, 1, offsets] = value.to(kv_layer.dtype)


def gather_kv(kv_layer: torch.Tensor, block_table: torch.Tensor, seq_len: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V, each (seq_len, num_kv_heads, head_dim)."""
    block_size = kv_layer.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_layer[block_table[:num_blocks].long()]  # (n, 2, block_size, kv_heads, head_dim)
    key = blocks[:, 0].flatten(0, 1)[:seq_len]
    value = blocks[:, 1].flatten(0, 1)[:seq_len]
    return key, value


def paged_attention_reference(query: torch.Tensor, kv_layer: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context.

    query: (num_tokens, num_heads, head_dim); returns the same shape. The K/V of the new tokens must
    already be in the cache. Query token i of a sequence sits at position seq_len - query_len + i and
    sees every position up to and including its own.
    """
    out = torch.empty_like(query)
    num_heads, num_kv_heads = query.shape[1], kv_layer.shape[3]
    group = num_heads // num_kv_heads
    for i in range(meta.num_seqs):
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        seq_len = meta.seq_lens_cpu[i]
        key, value = gather_kv(kv_layer, meta.block_tables[i], seq_len)
        q = query[start:end].transpose(0, 1).float()                     # (heads, q_len, dim)
        k = key.transpose(0, 1).float().repeat_interleave(group, dim=0)  # (heads, seq_len, dim)
        v = value.transpose(0, 1).float().repeat_interleave(group, dim=0)
        q_len = end - start
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        mask = q_pos[:, None] >= torch.arange(seq_len, device=query.device)[None, :]
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale)                         # (heads, q_len, dim)
        out[start:end] = o.transpose(0, 1).to(query.dtype)
    return out
