"""Triton decode attention over the paged KV cache: one new token per sequence, split along the
context (flash-decoding).

Same result as `paged_attention_reference` in engine/attention.py when every query_len is 1.
Decode attention reads the whole KV of every sequence and does little arithmetic on it, so its speed
is bytes over HBM bandwidth, and the two things that decide it are:

- GQA grouping. One program owns one KV head and computes all `group = num_heads // num_kv_heads`
  query heads that share it, so each K/V byte is read once, not `group` times. The group's query
  rows are padded to 16 so that q @ K^T and p @ V are tensor-core dots (the padding rows cost
  arithmetic, which decode has to spare, not bytes).
- Enough programs to fill the GPU. Batch 1 with 8 KV heads is 8 programs, a few percent of an
  H100's 132 SMs. As in flash-decoding (Dao et al., 2023), the context is cut into pieces, each
  piece gets its own program and writes a partial output with its log-sum-exp, and a small second
  kernel merges a sequence's pieces with the usual softmax rescaling.
- Even work per program. The launch has num_splits slots a sequence, and every piece is the same
  size, at least the batch's KV tokens over the programs the GPU wants in flight: a batch of short
  contexts keeps one piece each (its program writes the output, nothing to merge) and a long
  context among them takes as many slots as its length needs, where the short ones left them
  free (kernels/decode_pieces.py).

The piece table is computed on the device from the batch's seq_lens, so the launch depends only on
Python ints (batch size, num_splits): a CUDA graph captured once replays correctly for any context
lengths. With num_splits == 1 each program reads its whole sequence and no table or merge runs.

Scores live in the log2 domain (the softmax scale is premultiplied by log2(e)) so every exponential
is a single exp2.

A decode step may also hand the kernel the raw fused QKV projection (`prep`): each program then
normalizes and rotates its group's q heads itself, and the program whose piece holds the new
token stores that token's K and V before it reads the cache, which is what kernels/qkv_prep.py
would have done in a kernel of its own between the q/k/v matmul and this one. The arithmetic is
qkv_prep's, so the cache holds the same bits either way; q may differ in its last bit where the
compiler fuses the rotation's multiply-adds differently, and the output by rounding.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from tandem.engine.kernels import pdl
from tandem.engine.kernels.decode_pieces import Pieces, merge_pieces, piece_range, plan_pieces
from tandem.engine.kernels.fast_launch import Launcher
from tandem.engine.kernels.host_math import next_power_of_2
from tandem.engine.kernels.qkv_prep import norm_rotate
from tandem.engine.kernels.rotary import load_rope_row

_LOG2_E = 1.4426950408889634
_MIN_TOKENS_PER_SPLIT = 64  # one tile: below this a split is only merge overhead
_MAX_SPLITS = 64  # past this the merge costs more than the extra parallelism gains (H200 sweep)
_WAVES = 4  # programs per SM to aim for: batch-1 decode is latency-bound, more in flight helps
# Spare slots for a long context among short ones: up to 16 a sequence while the grid stays
# within 4096 programs, and 2 once the sequences' heads alone give every SM _WAVES programs (an
# H200 batch 128 at 1k took 149-161 us with 4 splits a sequence, 137-140 with 2 and 146 with 1,
# when each split wrote at least an empty log-sum-exp).
_MAX_SPREAD = 16
_SPREAD_PROGRAMS = 4096


# Values that change from one eager step to the next (the block table's width, the number of
# splits, which follows the batch size and the longest context) are not specialized on: Triton
# would otherwise compile a variant for each new class of value (1, a multiple of 16, other) in the
# middle of serving (a stall of the whole batch per compile).
@triton.jit(do_not_specialize=["stride_bt_seq", "num_splits"])
def _decode_split_kernel(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    slot_seq_ptr, first_slot_ptr, quantum_ptr,
    stride_q_seq, stride_q_head,
    stride_cache_block, stride_cache_kv, stride_cache_slot, stride_cache_head,
    stride_bt_seq, stride_out_seq, stride_out_head, qk_scale, num_splits, target_programs,
    positions_ptr, slot_ptr, cos_ptr, sin_ptr, stride_cos, stride_sin, q_weight_ptr,
    k_weight_ptr, eps,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr, ONE_SEQ: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, PREP: tl.constexpr, HAS_NORM: tl.constexpr,
):
    # PREP: q_ptr is the raw fused QKV row of each sequence; each program normalizes and rotates
    # its group's q heads itself, and the program whose piece holds the new token stores that
    # token's K and V (what kernels/qkv_prep.py does), so no kernel runs between the q/k/v matmul
    # and this one.
    # Before the wait only seq_lens, block tables and the piece table are read, written at the
    # step's start (with programmatic launch this kernel starts once the kernel two back has
    # completed), and the piece's first tile of K and V is asked of L2 (earlier steps wrote it; a
    # prefetch into L2, where stores land, never reads this step's new token stale), so that
    # tile's HBM latency passes under the q/k/v kernels still running.
    kv_head = tl.program_id(1)
    num_seqs = tl.num_programs(0)
    num_kv_heads = tl.num_programs(1)
    num_heads = num_kv_heads * GROUP
    if SINGLE_SPLIT:   # one program reads a whole sequence
        slot = tl.program_id(0)
        seq = tl.program_id(0).to(tl.int64)
        seq_len = tl.load(seq_lens_ptr + seq)
        start = tl.zeros([], tl.int64)
        end = seq_len.to(tl.int64)
        direct = True
    else:   # program (seq, head, split) is slot split * num_seqs + seq (decode_pieces.py)
        slot = tl.program_id(2) * num_seqs + tl.program_id(0)
        seq, start, end, count, seq_len = piece_range(
            slot, seq_lens_ptr, slot_seq_ptr, first_slot_ptr, quantum_ptr, num_splits,
            num_kv_heads, target_programs, BLOCK_N, ONE_SEQ)
        direct = count == 1
    if seq >= 0:   # an unused slot has no piece
        if PREFETCH and start < end:
            tokens = start + tl.arange(0, BLOCK_N)
            page = tl.load(block_tables_ptr + seq * stride_bt_seq + tokens // BLOCK_SIZE,
                           mask=tokens < end, other=0).to(tl.int64)
            rows = (page * stride_cache_block + (tokens % BLOCK_SIZE) * stride_cache_slot
                    + kv_head * stride_cache_head)
            pdl.prefetch_row_heads_l2(cache_ptr, rows, 1, HEAD_DIM, LINE=64,
                                      LINES=(HEAD_DIM + 63) // 64)
            pdl.prefetch_row_heads_l2(cache_ptr + stride_cache_kv, rows, 1, HEAD_DIM, LINE=64,
                                      LINES=(HEAD_DIM + 63) // 64)
        if PREP:  # the step's inputs and the rotary tables, ahead of the wait like seq_lens
            position = tl.load(positions_ptr + seq).to(tl.int64)
            new_slot = tl.load(slot_ptr + seq).to(tl.int64)
            cos1, cos2, sin1, sin2 = load_rope_row(cos_ptr, sin_ptr, position, stride_cos,
                                                   stride_sin, HEAD_DIM // 2)
        pdl.wait(USE_PDL)
        group_rows = tl.arange(0, BLOCK_G)
        if PREP:
            row = q_ptr + seq * stride_q_seq
            q = _prepare_group(row, kv_head, num_heads, num_kv_heads, cos1, cos2, sin1, sin2,
                               q_weight_ptr,
                               k_weight_ptr, eps, cache_ptr, new_slot, stride_cache_block,
                               stride_cache_kv, stride_cache_slot, stride_cache_head,
                               (start <= seq_len - 1) & (seq_len - 1 < end),
                               GROUP, HEAD_DIM, BLOCK_SIZE, BLOCK_G, HAS_NORM)
        else:
            heads = kv_head * GROUP + group_rows
            dims = tl.arange(0, HEAD_DIM)
            q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head
                        + dims[None, :], mask=(group_rows < GROUP)[:, None], other=0.0)
        _attend_split(q, cache_ptr, block_tables_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                      stride_cache_block, stride_cache_kv,
                      stride_cache_slot, stride_cache_head, stride_bt_seq, stride_out_seq,
                      stride_out_head, qk_scale, seq, kv_head, slot, num_heads,
                      start, end, direct, GROUP, HEAD_DIM, BLOCK_SIZE, BLOCK_G, BLOCK_N)
    else:
        pdl.wait(USE_PDL)
    pdl.release(USE_PDL)


@triton.jit
def _prepare_group(
    row_ptr, kv_head, num_heads, num_kv_heads, cos1, cos2, sin1, sin2, q_weight_ptr,
    k_weight_ptr, eps, cache_ptr,
    slot, stride_cache_block, stride_cache_kv, stride_cache_slot, stride_cache_head, store_kv,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, HAS_NORM: tl.constexpr,
):
    """The group's q heads (BLOCK_G, HEAD_DIM) from a raw fused QKV row, normalized and rotated
    as kernels/qkv_prep.py does; with store_kv, the new token's K (so prepared) and V stored at
    `slot` first (nothing when slot < 0), and visible to this program's loads after."""
    q1, q2 = norm_rotate(row_ptr + kv_head * GROUP * HEAD_DIM, GROUP, q_weight_ptr, eps,
                         cos1, cos2, sin1, sin2, HAS_NORM, BLOCK_G, HEAD_DIM // 2)
    if store_kv:
        k_row = row_ptr + (num_heads + kv_head) * HEAD_DIM
        k1, k2 = norm_rotate(k_row, 1, k_weight_ptr, eps, cos1, cos2, sin1, sin2, HAS_NORM, 2,
                             HEAD_DIM // 2)               # (2, HEAD_DIM / 2): row 0 is the head
        v_row = row_ptr + (num_heads + num_kv_heads + kv_head) * HEAD_DIM
        rows = tl.arange(0, 2)[:, None]
        dims = tl.arange(0, HEAD_DIM // 2)[None, :]
        live = (rows < 1) & (slot >= 0)
        v1 = tl.load(v_row + rows * 0 + dims, mask=live, other=0.0)
        v2 = tl.load(v_row + HEAD_DIM // 2 + rows * 0 + dims, mask=live, other=0.0)
        dst = (cache_ptr + (slot // BLOCK_SIZE) * stride_cache_block
               + (slot % BLOCK_SIZE) * stride_cache_slot + kv_head * stride_cache_head
               + rows * 0 + dims)                        # (2, HEAD_DIM / 2), row 1 masked
        cache_dtype = cache_ptr.dtype.element_ty
        tl.store(dst, k1.to(cache_dtype), mask=live)
        tl.store(dst + HEAD_DIM // 2, k2.to(cache_dtype), mask=live)
        tl.store(dst + stride_cache_kv, v1.to(cache_dtype), mask=live)
        tl.store(dst + stride_cache_kv + HEAD_DIM // 2, v2.to(cache_dtype), mask=live)
    tl.debug_barrier()  # the stores above, before this program's threads read the cache
    return tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (BLOCK_G, HEAD_DIM))


@triton.jit
def _attend_split(
    q, cache_ptr, block_tables_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    stride_cache_block, stride_cache_kv, stride_cache_slot,
    stride_cache_head, stride_bt_seq, stride_out_seq, stride_out_head, qk_scale,
    seq, kv_head, slot, num_heads, start, end, direct,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program's piece: attention of q (BLOCK_G, HEAD_DIM), the query heads of `kv_head`,
    over tokens [start, end) of `seq`, written as the final output (`direct`: the sequence's
    only piece) or as the partial of `slot` with its log-sum-exp."""
    group_rows = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + group_rows
    is_head = group_rows < GROUP
    dims = tl.arange(0, HEAD_DIM)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    block_table = block_tables_ptr + seq * stride_bt_seq
    kv_base = cache_ptr + kv_head * stride_cache_head
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        is_token = tokens < end
        page = tl.load(block_table + tokens // BLOCK_SIZE, mask=is_token, other=0).to(tl.int64)
        rows = page * stride_cache_block + (tokens % BLOCK_SIZE) * stride_cache_slot
        k = tl.load(kv_base + rows[:, None] + dims[None, :], mask=is_token[:, None], other=0.0)
        v = tl.load(kv_base + stride_cache_kv + rows[:, None] + dims[None, :],
                    mask=is_token[:, None], other=0.0)     # (BLOCK_N, HEAD_DIM)
        scores = tl.dot(q, tl.trans(k))                     # (BLOCK_G, BLOCK_N), unscaled
        scores = tl.where(is_token[None, :], scores, float("-inf"))
        # Every tile holds at least one real token, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # A padded sequence (seq_len 0) has l_i == 0: its output is 0, never 0/0.
    has_keys = l_i > 0.0
    partial = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if direct:
        dst = out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :]
        tl.store(dst, partial.to(out_ptr.dtype.element_ty), mask=is_head[:, None])
    else:
        part_row = slot.to(tl.int64) * num_heads + heads                   # (BLOCK_G,)
        tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], partial,
                 mask=is_head[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part_row, lse, mask=is_head)


_split_launch = Launcher(_decode_split_kernel)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                      device: torch.device) -> int:
    """The most splits a sequence of the launch may take: enough for about _WAVES programs per
    SM, and up to _MAX_SPREAD while the grid stays within _SPREAD_PROGRAMS programs (2 once the
    sequences' heads alone give every SM _WAVES programs), but none shorter than
    _MIN_TOKENS_PER_SPLIT tokens. A CUDA-graph caller should pick it once, from the
    longest context it will serve, and pass it in on every replay.

    Each sequence takes only the splits its length needs (see `_decode_split_kernel`), so the
    spare ones are for a long context among short ones: on an H200 at 8 KV heads, batch 32 with
    one 32k-token context among 1k ones took 363 us in three equal splits and 99 us with up to
    16 per sequence, batch 128 1024 us in one and 567 us in up to two."""
    seq_heads = max(num_seqs * num_kv_heads, 1)
    num_sms = _device_sms(device)
    to_fill = math.ceil(_WAVES * num_sms / seq_heads)
    to_spread = (min(_MAX_SPREAD, _SPREAD_PROGRAMS // seq_heads)
                 if seq_heads <= _WAVES * num_sms else 2)
    by_length = math.ceil(max_seq_len / _MIN_TOKENS_PER_SPLIT)
    return max(1, min(max(to_fill, to_spread), by_length, _MAX_SPLITS))


def choose_tiles(seq_heads: int, num_splits: int, device: torch.device) -> tuple[int, int, int]:
    """(block_n, num_warps, num_stages) for a launch over seq_heads (sequences x KV heads).

    Split contexts keep 64-token tiles, two deep while the sequences' heads fit one wave of the
    GPU's SMs (many short pieces), three past it. A whole context per program streams longer:
    three tiles in flight, and 128-token tiles while there are at most two programs an SM, whose
    loads alone must keep its memory pipe full. Measured on an H200 at 8 KV heads, one split:
    batch 32 at 4k took 128 us with 128-token tiles against 145 us with 64; batch 64 took 249 us
    with 64-token tiles against 292 us with 128. Up to 16 splits, batch 32 at 4k took 139 us
    three deep, 144 us two deep."""
    num_sms = _device_sms(device)
    if num_splits > 1:
        tiles = (64, 4, 3) if seq_heads > num_sms else _SPLIT_TILES
    else:
        tiles = (128, 4, 3) if seq_heads <= 2 * num_sms else (64, 4, 3)
    return _SPLIT_TILES if tiles in _too_big else tiles


_SPLIT_TILES = (64, 4, 2)   # fits every GPU Triton runs on
# Tiles whose pipeline passed this GPU's shared memory (128-token tiles three deep take about 200
# KiB at head_dim 128: an H100's SM has 227, an A100's 163): `choose_tiles` no longer offers them.
_too_big: set[tuple[int, int, int]] = set()


def step_pieces(seq_lens: torch.Tensor, num_kv_heads: int, num_splits: int,
                out: Pieces | None = None) -> Pieces | None:
    """The piece table that `decode_attention` over seq_lens with num_splits would make itself,
    for a caller to make once a step: a CUDA graph makes it at the step's start, into `out`, so
    that the kernels launched programmatically read it ahead of their wait. None for one split
    or a batch of one, which the kernels place without a table."""
    if num_splits == 1 or seq_lens.shape[0] == 1:
        return None
    device = seq_lens.device
    block_n = choose_tiles(seq_lens.shape[0] * num_kv_heads, num_splits, device)[0]
    return plan_pieces(seq_lens, num_kv_heads, num_splits, block_n,
                       _WAVES * _device_sms(device), out)


@dataclass(frozen=True)
class QKVPrep:
    """prepare_qkv's other inputs (kernels/qkv_prep.py), for the split kernel to do that work
    itself on a decode step."""
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    q_weight: torch.Tensor | None   # Qwen3's per-head norms, or None
    k_weight: torch.Tensor | None
    eps: float
    slot_mapping: torch.Tensor


def decode_attention(query: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, out: torch.Tensor, max_seq_len: int,
                     num_splits: int | None = None,
                     tiles: tuple[int, int, int] | None = None,
                     prep: QKVPrep | None = None, pieces: Pieces | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context; writes and returns `out`.

    query, out: (num_seqs, num_heads, head_dim); kv_layer: (num_blocks, 2, block_size,
    num_kv_heads, head_dim), any strides with head_dim contiguous; block_tables: (num_seqs,
    max_blocks) int32; seq_lens: (num_seqs,) int32, including the new token, whose K/V must already
    be stored. max_seq_len only sizes num_splits when num_splits is None. tiles: (block_n,
    num_warps, num_stages), by `choose_tiles` when None. With `prep`, query is instead the raw
    fused QKV projection (num_seqs, (num_heads + 2 * num_kv_heads) * head_dim), rows contiguous:
    the kernel prepares q and stores the new K and V as `prepare_qkv` would (qkv is not changed).
    pieces: the step's piece table for num_splits > 1 (`plan_pieces`, which a CUDA graph runs at
    the step's start, before the first kernel that may launch programmatically); made here when
    None.
    """
    num_seqs, num_heads, head_dim = out.shape
    block_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    if prep is None:
        check_attention_shapes(query, kv_layer, block_tables, out)
        stride_q_seq, stride_q_head = query.stride(0), query.stride(1)
    else:
        check_attention_shapes(out, kv_layer, block_tables, out)
        if query.shape != (num_seqs, (num_heads + 2 * num_kv_heads) * head_dim) \
                or query.stride(-1) != 1 or prep.cos.stride(-1) != 1:
            raise ValueError(f"qkv of shape {tuple(query.shape)} does not match out "
                             f"{tuple(out.shape)} and {num_kv_heads} KV heads")
        stride_q_seq, stride_q_head = query.stride(0), head_dim
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, query.device)
    chosen = tiles is None
    if chosen:
        tiles = choose_tiles(num_seqs * num_kv_heads, num_splits, query.device)
    group = num_heads // num_kv_heads
    single = num_splits == 1
    target = _WAVES * _device_sms(query.device)
    if single or num_seqs == 1:
        pieces = None   # whole sequences, or a batch of one, which the kernels place themselves
    elif pieces is None:
        if pdl.enabled(query):   # the split kernel reads the table ahead of its wait
            raise ValueError("under programmatic launch the piece table is made at the "
                             "step's start (step_pieces) and passed in")
        pieces = plan_pieces(seq_lens, num_kv_heads, num_splits, tiles[0], target)
    elif pieces.slot_seq.shape[0] != num_seqs * num_splits:
        raise ValueError(f"piece table of {pieces.slot_seq.shape[0]} slots for {num_seqs} "
                         f"sequences x {num_splits} splits")
    # Without a table its pointers are unused by the kernels; any tensor of the device will do.
    table = ((seq_lens, seq_lens, seq_lens) if pieces is None
             else (pieces.slot_seq, pieces.first_slot, pieces.quantum))
    if single:
        part_out = part_lse = out  # unused by the kernel, as above
    else:
        part_out = torch.empty((num_seqs * num_splits, num_heads, head_dim), dtype=torch.float32,
                               device=query.device)
        part_lse = torch.empty((num_seqs * num_splits, num_heads), dtype=torch.float32,
                               device=query.device)

    has_norm = prep is not None and prep.q_weight is not None
    p = prep or QKVPrep(query, query, query, None, None, 0.0, query)   # unused without PREP

    def launch(block_n: int, num_warps: int, num_stages: int) -> int:
        _split_launch(
            (num_seqs, num_kv_heads, num_splits),
            query, kv_layer, block_tables, seq_lens, out, part_out, part_lse, *table,
            stride_q_seq, stride_q_head,
            *kv_layer.stride()[:4],
            block_tables.stride(0), out.stride(0), out.stride(1), scale * _LOG2_E, num_splits,
            target, p.positions, p.slot_mapping, p.cos, p.sin, p.cos.stride(0), p.sin.stride(0),
            p.q_weight if has_norm else query, p.k_weight if has_norm else query, p.eps,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, PREP=prep is not None,
            HAS_NORM=has_norm,
            BLOCK_G=max(16, next_power_of_2(group)), BLOCK_N=block_n, SINGLE_SPLIT=single,
            ONE_SEQ=num_seqs == 1 and not single, PREFETCH=pdl.prefetch_weights(query),
            num_warps=num_warps, num_stages=num_stages, **pdl.launch_options(query),
        )
        return block_n

    try:
        block_n = launch(*tiles)
    except triton.runtime.errors.OutOfResources:
        if not chosen or tiles == _SPLIT_TILES:
            raise
        _too_big.add(tiles)  # a GPU with less shared memory than the tiles were sized for
        block_n = launch(*_SPLIT_TILES)
    if not single:
        merge_pieces(part_out, part_lse, out, seq_lens, pieces, num_splits, num_kv_heads, target,
                     block_n, pdl.launch_options(query))
    return out


def compile_variants(kv_layer: torch.Tensor, num_heads: int, prep: QKVPrep | None = None
                     ) -> None:
    """Compiles now every variant a decode step over kv_layer (one layer of the engine's cache)
    may launch later, so that none stalls a serving batch to compile (the engine calls it once,
    at start-up): the split kernel with each tile choice of `choose_tiles`, for a batch of one and
    of two (a batch of one places its pieces without a table), reading block 0 for one-token
    sequences (each writes only its own output), with `prep` also as a decode step runs it
    (prep's one position and slot, which must be -1: nothing is stored), and the piece table and
    merge. Tiles too big for this GPU's shared memory are found here and left out of the
    choice."""
    head_dim, device = kv_layer.shape[4], kv_layer.device
    num_kv_heads = kv_layer.shape[3]
    for num_seqs in (1, 2):
        query = torch.zeros((num_seqs, num_heads, head_dim), dtype=kv_layer.dtype, device=device)
        qkv = torch.zeros((num_seqs, (num_heads + 2 * num_kv_heads) * head_dim),
                          dtype=kv_layer.dtype, device=device)
        block_tables = torch.zeros((num_seqs, 1), dtype=torch.int32, device=device)
        seq_lens = torch.ones(num_seqs, dtype=torch.int32, device=device)
        seq_prep = prep and replace(prep, positions=prep.positions.repeat(num_seqs),
                                    slot_mapping=prep.slot_mapping.repeat(num_seqs))
        # One split count a merge tile width (decode_pieces.MERGE_TILES): 2, 32 and 64.
        for num_splits, tiles in ((1, (128, 4, 3)), (1, (64, 4, 3)), (2, (64, 4, 3)),
                                  (2, _SPLIT_TILES), (32, _SPLIT_TILES), (64, _SPLIT_TILES)):
            if tiles in _too_big:
                continue
            try:
                decode_attention(query, kv_layer, block_tables, seq_lens, 1.0,
                                 torch.empty_like(query), 1, num_splits=num_splits, tiles=tiles)
                if seq_prep is not None:
                    decode_attention(qkv, kv_layer, block_tables, seq_lens, 1.0,
                                     torch.empty_like(query), 1, num_splits=num_splits,
                                     tiles=tiles, prep=seq_prep)
            except triton.runtime.errors.OutOfResources:
                if tiles == _SPLIT_TILES:
                    raise
                _too_big.add(tiles)   # past this GPU's shared memory: never chosen


def check_attention_shapes(query: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           out: torch.Tensor) -> None:
    """Raises ValueError for shapes and layouts the attention kernels do not handle."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_layer.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1) or kv_layer.shape[4] != head_dim:
        raise ValueError(f"head_dim must be a power of two >= 16 and match the cache, got "
                         f"{head_dim} and {kv_layer.shape[4]}")
    if query.stride(-1) != 1 or kv_layer.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("attention needs head_dim contiguous in query, cache and out")
    if block_tables.stride(-1) != 1:
        raise ValueError("attention needs each block table row contiguous")
    if out.shape != query.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(query.shape)}")
