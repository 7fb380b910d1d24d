"""Triton prefill attention: varlen causal attention of new tokens over a paged context.

Same result as `paged_attention_reference` in engine/attention.py for any batch: a sequence's
query_len new tokens sit at the end of its seq_len tokens of context, so a whole prompt, one chunk
of a chunked prefill and the uncached tail of a prompt with a cached prefix are all this one
kernel. K and V of the whole context, new tokens included, are read from the paged cache (the
caller stores the new K/V first), which is what lets a cached prefix be used without copying it.

The tiling is FlashAttention-2's (Dao, 2023): one program owns BLOCK_M query rows of one head,
walks the keys in BLOCK_N tiles with an online softmax, and writes its rows once at the end. Each
key tile is gathered through the block table, one page index per key. Causality is used twice:

- tiles wholly after the program's last query position are never visited (for a 4k prompt that is
  half of all tiles);
- tiles wholly at or before its first query position need no mask, so the main loop runs without
  one and only the few tiles on the diagonal take the masked path.

The grid is (num_heads, query tiles, num_seqs). Heads vary fastest, so the `group` query heads of
one KV head run side by side and share its K/V through L2; query tiles run last-first, so the
longest programs (the ones furthest along the diagonal) start first and the short ones fill the
tail. A query tile past its sequence's query_len exits at once, which is how a batch of sequences
of different lengths shares one launch sized by max_query_len.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.engine.attention import AttentionMetadata
from tandem.engine.kernels import pdl
from tandem.engine.kernels.decode_attention import check_attention_shapes
from tandem.engine.kernels.fast_launch import Launcher
from tandem.engine.kernels.host_math import cdiv

_LOG2_E = 1.4426950408889634


@triton.jit
def _attend_tile(q, acc, m_i, l_i, kv_base, block_table, stride_cache_block, stride_cache_kv,
                 stride_cache_slot, tile_start, positions, kv_end, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr):
    keys = tile_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    is_key = keys < kv_end
    if MASKED:
        page = tl.load(block_table + keys // BLOCK_SIZE, mask=is_key, other=0)
    else:
        page = tl.load(block_table + keys // BLOCK_SIZE)
    rows = page.to(tl.int64) * stride_cache_block + (keys % BLOCK_SIZE) * stride_cache_slot
    k_ptrs = kv_base + rows[:, None] + dims[None, :]       # (BLOCK_N, HEAD_DIM)
    if MASKED:
        k = tl.load(k_ptrs, mask=is_key[:, None], other=0.0)
        v = tl.load(k_ptrs + stride_cache_kv, mask=is_key[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(k_ptrs + stride_cache_kv)
    scores = tl.dot(q, tl.trans(k))                         # (BLOCK_M, BLOCK_N), unscaled
    if MASKED:
        is_visible = (keys[None, :] <= positions[:, None]) & is_key[None, :]
        scores = tl.where(is_visible, scores, float("-inf"))
    # The scale is applied to the row max and inside the exponent, where it fuses into one FMA,
    # rather than in a separate multiply over the whole tile. A row's running max is finite from
    # its first tile on: the first tile it visits always holds key 0 or a key at or before its own
    # position.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


# The block table's width changes from step to step: not specialized on, so it never causes a
# new compile while serving (decode_attention.py says why that matters).
@triton.jit(do_not_specialize=["stride_bt_seq"])
def _prefill_kernel(
    q_ptr, cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    stride_q_token, stride_q_head,
    stride_cache_block, stride_cache_kv, stride_cache_slot, stride_cache_head,
    stride_bt_seq, stride_out_token, stride_out_head, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.enter(USE_PDL)
    head = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len                           # cached prefix before the new tokens

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    is_row = rows < q_len
    tokens = (q_start + rows).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tokens[:, None] * stride_q_token + head * stride_q_head + dims[None, :],
                mask=is_row[:, None], other=0.0)           # (BLOCK_M, HEAD_DIM)
    positions = context_len + rows
    first_position = context_len + tile * BLOCK_M
    kv_end = tl.minimum(first_position + BLOCK_M, seq_len)
    # Keys below unmasked_end are visible to every row of this tile.
    unmasked_end = ((first_position + 1) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    block_table = block_tables_ptr + seq * stride_bt_seq
    kv_base = cache_ptr + (head // GROUP) * stride_cache_head
    for tile_start in range(0, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, kv_base, block_table, stride_cache_block, stride_cache_kv,
            stride_cache_slot, tile_start, positions, kv_end, qk_scale,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASKED=False)
    for tile_start in range(unmasked_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, kv_base, block_table, stride_cache_block, stride_cache_kv,
            stride_cache_slot, tile_start, positions, kv_end, qk_scale,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASKED=True)

    out = acc / l_i[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_out_token + head * stride_out_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=is_row[:, None])


_prefill_launch = Launcher(_prefill_kernel)


_SHORT_QUERY = 64   # up to this many query rows a step takes the short chunks' tiles


def default_config(head_dim: int, max_query_len: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for a shape. Short chunks take 64-row query tiles
    so fewer rows are padding. For head_dim 128, 128x128 tiles over 8 warps were the fastest of
    the twelve configs that benchmarks/kernel_bench.py sweeps on an H200 (4k prompt: 359 TFLOP/s,
    against 320 for 128x64; 4k chunk after a 4k prefix: 385)."""
    if head_dim > 128:
        return 64, 32, 4, 2
    if max_query_len <= _SHORT_QUERY:
        return 64, 64, 4, 3
    if head_dim == 128:
        return 128, 128, 8, 3
    return 128, 64, 4, 3


def prefill_attention(query: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                      scale: float, out: torch.Tensor,
                      config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context; writes and returns
    `out`.

    query, out: (num_tokens, num_heads, head_dim); kv_layer: (num_blocks, 2, block_size,
    num_kv_heads, head_dim), any strides with head_dim contiguous. The new tokens' K/V must already
    be in the cache. `config` overrides default_config's (block_m, block_n, num_warps, num_stages).
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    check_attention_shapes(query, kv_layer, meta.block_tables, out)
    if num_tokens == 0 or meta.num_seqs == 0:
        return out
    block_m, block_n, num_warps, num_stages = config or default_config(head_dim,
                                                                       meta.max_query_len)
    grid = (num_heads, cdiv(meta.max_query_len, block_m), meta.num_seqs)
    _prefill_launch(
        grid,
        query, kv_layer, meta.block_tables, meta.query_start_loc, meta.seq_lens, out,
        query.stride(0), query.stride(1),
        *kv_layer.stride()[:4],
        meta.block_tables.stride(0), out.stride(0), out.stride(1), scale * _LOG2_E,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
        **pdl.launch_options(query),
    )
    return out


# One query length per tile choice of `default_config` (compile_variants compiles each).
VARIANT_QUERY_LENS = (_SHORT_QUERY, _SHORT_QUERY + 1)


def compile_variants(kv_layer: torch.Tensor, num_heads: int) -> None:
    """Compiles now each tile variant `default_config` may pick, so that none compiles while
    serving: the engine calls it once, at start-up. Each runs one sequence whose new tokens are
    its whole context, over the first blocks of kv_layer (one layer of the engine's cache); it
    writes only a scratch output. Without it a server's first chunk of at most 64 tokens (a short
    prompt, a prompt's short last chunk) waited about a second for its variant to compile
    (benchmarks/first_step_bench.py)."""
    head_dim, block_size, device = kv_layer.shape[4], kv_layer.shape[2], kv_layer.device
    for query_len in VARIANT_QUERY_LENS:
        num_blocks = -(-query_len // block_size)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, query_len], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([query_len], dtype=torch.int32, device=device),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
            slot_mapping=torch.full((query_len,), -1, dtype=torch.int64, device=device),
            max_query_len=query_len, max_seq_len=query_len,
            query_start_loc_cpu=[0, query_len], seq_lens_cpu=[query_len])
        query = torch.zeros((query_len, num_heads, head_dim), dtype=kv_layer.dtype, device=device)
        prefill_attention(query, kv_layer, meta, 1.0, torch.empty_like(query))
