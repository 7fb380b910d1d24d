"""How a decode step's KV tokens are dealt out to the decode attention's programs, and the merge of
a sequence's pieces.

The split kernel (kernels/decode_attention.py) runs num_seqs x num_splits programs per KV head.
They are slots, not one row of splits per sequence: the batch's tokens are cut into pieces of one
size, the quantum (a sequence's last piece may also take a short remainder: `num_pieces`), and
each sequence takes as many pieces as its length needs, on consecutive slots. So one long context
among short ones is read by as many programs as its length asks for, where a fixed row of splits
per sequence left it to num_splits programs (2 at large batches) while the short ones' spare
splits sat empty.

`plan_pieces` computes the step's table once, on the device, from seq_lens: the quantum, each
sequence's first slot and each slot's sequence (-1 past the last piece). It is a tiny kernel and
a CUDA graph replays it with the step, so one graph serves every mix of lengths. The quantum is
the least size, in whole tiles (so only a piece's last tile is ragged), that is at least:
- the batch's tokens times its KV heads over the programs the GPU wants in flight (each program's
  share), and
- enough that the pieces fit the slots.

A sequence of one piece gets its output from its program directly. The merge combines the pieces of
the others with the usual softmax rescaling, a tile of pieces at a time, so a few tile widths
serve any count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.engine.kernels import pdl
from tandem.engine.kernels.fast_launch import Launcher
from tandem.engine.kernels.host_math import cdiv, next_power_of_2

_LENS_BLOCK = tl.constexpr(256)   # sequence lengths read at a time
_SLOT_BLOCK = 64                 # slots each program of the table kernel fills
# Pieces the merge combines at a time: the next power of two of the slots a sequence, 16 to 64. A
# batch of one reads its up to 64 pieces in one pass (a first version, tiles of 16 and the table
# read after the launch wait, took qwen3-0.6b's batch-1 step at 4k from 0.95 to 1.06 ms on an
# H200), while a wide tile for a few pieces costs registers (a 64-wide tile for 3 splits cost
# batch 32 about 40% more attention time).
MERGE_TILES = (16, 32, 64)


@dataclass(frozen=True)
class Pieces:
    """A decode step's piece table: int32 tensors on the device."""
    slot_seq: torch.Tensor     # (num_seqs * num_splits,): the sequence of each slot, -1 when unused
    first_slot: torch.Tensor   # (num_seqs,): the slot of each sequence's first piece
    quantum: torch.Tensor      # (1,): tokens a piece, a multiple of the tile

    @staticmethod
    def empty(num_seqs: int, num_splits: int, device: torch.device) -> Pieces:
        return Pieces(torch.full((num_seqs * num_splits,), -1, dtype=torch.int32, device=device),
                      torch.zeros(num_seqs, dtype=torch.int32, device=device),
                      torch.zeros(1, dtype=torch.int32, device=device))

    def view(self, num_seqs: int, num_splits: int) -> Pieces:
        """The first num_seqs sequences' table (for a smaller graph bucket's launch)."""
        return Pieces(self.slot_seq[:num_seqs * num_splits], self.first_slot[:num_seqs],
                      self.quantum)


@triton.jit
def num_pieces(seq_len, quantum, align):
    """The pieces of a sequence: at least one, so a padded sequence (length 0) gets its zeros.

    A piece of 8 tiles or more takes a remainder of up to an eighth of it (in whole tiles) into
    the sequence's last piece instead of a piece of its own: a context just past a multiple of
    the quantum (each decode step adds one token) would otherwise take a program and a merge for
    a few tokens (on an H200, 64 sequences at 1,025 tokens cost 6-9% more than at 1,000). A
    shorter piece keeps its tail apart: one more tile on a piece of one to seven costs more than
    a program the GPU has room for (a batch of one)."""
    slack = quantum // (8 * align) * align
    return tl.maximum(tl.cdiv(seq_len - slack, quantum), 1)


@triton.jit
def _count_pieces(seq_lens_ptr, num_seqs, quantum, align):
    total = tl.zeros([_LENS_BLOCK], tl.int32)
    for first in range(0, num_seqs, _LENS_BLOCK):
        rows = first + tl.arange(0, _LENS_BLOCK)
        lens = tl.load(seq_lens_ptr + rows, mask=rows < num_seqs, other=0)
        total += tl.where(rows < num_seqs, num_pieces(lens, quantum, align), 0)
    return tl.sum(total, axis=0)


@triton.jit(do_not_specialize=["num_seqs", "num_slots", "target_programs", "num_kv_heads",
                               "align"])
def _piece_table_kernel(seq_lens_ptr, slot_seq_ptr, first_slot_ptr, quantum_ptr, num_seqs,
                        num_slots, target_programs, num_kv_heads, align,
                        SLOT_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.wait(USE_PDL)   # seq_lens may come from the kernel just before
    lens_sum = tl.zeros([_LENS_BLOCK], tl.int64)
    for first in range(0, num_seqs, _LENS_BLOCK):
        rows = first + tl.arange(0, _LENS_BLOCK)
        lens_sum += tl.load(seq_lens_ptr + rows, mask=rows < num_seqs, other=0)
    total = tl.sum(lens_sum, axis=0)
    share = tl.cdiv(total * num_kv_heads, target_programs)
    quantum = tl.maximum(tl.maximum(share, tl.cdiv(total, num_slots)), 1)
    quantum = (tl.cdiv(quantum, align) * align).to(tl.int32)
    # Grow by about an eighth until the pieces fit; at the longest length every sequence is one
    # piece, and there are at least as many slots as sequences.
    while _count_pieces(seq_lens_ptr, num_seqs, quantum, align) > num_slots:
        quantum += align * tl.cdiv(quantum, 8 * align)

    pid = tl.program_id(0)
    slots = pid * SLOT_BLOCK + tl.arange(0, SLOT_BLOCK)
    owner = tl.zeros([SLOT_BLOCK], tl.int32)
    carry = 0
    for first in range(0, num_seqs, _LENS_BLOCK):
        rows = first + tl.arange(0, _LENS_BLOCK)
        is_seq = rows < num_seqs
        lens = tl.load(seq_lens_ptr + rows, mask=is_seq, other=0)
        count = tl.where(is_seq, num_pieces(lens, quantum, align), 0)
        ends = carry + tl.cumsum(count, axis=0)
        # A slot's sequence is the number of sequences whose pieces all lie before it.
        owner += tl.sum((ends[None, :] <= slots[:, None]).to(tl.int32), axis=1)
        if pid == 0:
            tl.store(first_slot_ptr + rows, ends - count, mask=is_seq)
        carry += tl.sum(count, axis=0)
    tl.store(slot_seq_ptr + slots, tl.where(slots < carry, owner, -1), mask=slots < num_slots)
    if pid == 0:
        tl.store(quantum_ptr, quantum)
    pdl.release(USE_PDL)


_piece_table_launch = Launcher(_piece_table_kernel)


def plan_pieces(seq_lens: torch.Tensor, num_kv_heads: int, num_splits: int, align: int,
                target_programs: int, out: Pieces | None = None) -> Pieces:
    """The piece table of a decode step over seq_lens ((num_seqs,) int32 on the device) with
    num_splits slots a sequence (at least 2), written into `out` (for a CUDA graph's static
    buffers) or new tensors. Pieces are multiples of `align` tokens."""
    num_seqs = seq_lens.shape[0]
    if num_splits < 2:
        raise ValueError(f"pieces need at least 2 slots a sequence, got {num_splits}")
    pieces = out or Pieces.empty(num_seqs, num_splits, seq_lens.device)
    num_slots = num_seqs * num_splits
    if pieces.slot_seq.shape[0] < num_slots or pieces.first_slot.shape[0] < num_seqs:
        raise ValueError(f"piece table for {pieces.first_slot.shape[0]} sequences is too small "
                         f"for {num_seqs} x {num_splits}")
    _piece_table_launch(
        (cdiv(num_slots, _SLOT_BLOCK),),
        seq_lens, pieces.slot_seq, pieces.first_slot, pieces.quantum, num_seqs, num_slots,
        target_programs, num_kv_heads, align, SLOT_BLOCK=_SLOT_BLOCK, num_warps=4,
        **pdl.launch_options(seq_lens))
    return pieces


@triton.jit
def one_seq_quantum(seq_len, num_splits, num_kv_heads, target_programs, align):
    """The quantum `plan_pieces` gives a batch of one sequence, computed in the kernels that use
    it: a batch of one makes no table (its kernel and loads cost a qwen3-0.6b step at batch 1
    on an H200 0.86 -> 0.90 ms at 1k, 0.95 -> 1.02 at 4k)."""
    quantum = tl.maximum(tl.maximum(tl.cdiv(seq_len, num_splits),
                                    tl.cdiv(seq_len * num_kv_heads, target_programs)), 1)
    return tl.cdiv(quantum, align) * align


@triton.jit
def piece_range(slot, seq_lens_ptr, slot_seq_ptr, first_slot_ptr, quantum_ptr, num_splits,
                num_kv_heads, target_programs, align, ONE_SEQ: tl.constexpr):
    """(seq, start, end, count, seq_len) of a slot's piece: tokens [start, end) of sequence `seq`
    (-1 for an unused slot), which has `count` pieces and `seq_len` tokens. ONE_SEQ: a batch of
    one, without a table."""
    if ONE_SEQ:
        seq_len = tl.load(seq_lens_ptr)
        quantum = one_seq_quantum(seq_len, num_splits, num_kv_heads, target_programs, align)
        count = num_pieces(seq_len, quantum, align)
        seq = tl.where(slot < count, 0, -1).to(tl.int64)
        first = 0
    else:
        seq = tl.load(slot_seq_ptr + slot).to(tl.int64)
        live = seq >= 0
        seq_len = tl.load(seq_lens_ptr + seq, mask=live, other=0)
        first = tl.load(first_slot_ptr + seq, mask=live, other=0)
        quantum = tl.load(quantum_ptr)
        count = num_pieces(seq_len, quantum, align)
    piece = slot - first
    start = piece.to(tl.int64) * quantum
    end = tl.where(piece == count - 1, seq_len, tl.minimum(start + quantum, seq_len))
    return seq, start, end, count, seq_len


@triton.jit(do_not_specialize=["num_splits"])
def _merge_pieces_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, seq_lens_ptr, first_slot_ptr, quantum_ptr,
    stride_out_seq, stride_out_head, num_splits, num_kv_heads, target_programs, align,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, ONE_SEQ: tl.constexpr, USE_PDL: tl.constexpr,
):
    # The table and seq_lens were written at the step's start, so they are read before the wait
    # and only the partials' loads wait on the split kernel.
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    if ONE_SEQ:
        quantum = one_seq_quantum(seq_len, num_splits, num_kv_heads, target_programs, align)
        first = tl.zeros([], tl.int64)
    else:
        quantum = tl.load(quantum_ptr)
        first = tl.load(first_slot_ptr + seq).to(tl.int64)
    count = num_pieces(seq_len, quantum, align)
    pdl.enter(USE_PDL)
    if count > 1:   # a sequence of one piece has its output from the split kernel
        dims = tl.arange(0, HEAD_DIM)
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.zeros([], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for tile in range(0, count, BLOCK_S):
            piece = tile + tl.arange(0, BLOCK_S)
            is_piece = piece < count
            row = (first + piece) * num_heads + head                     # (BLOCK_S,)
            lse = tl.load(part_lse_ptr + row, mask=is_piece, other=float("-inf"))
            # Every piece of a sequence of several holds keys, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(lse, axis=0))
            alpha = tl.exp2(m_i - m_new)
            weight = tl.exp2(lse - m_new)
            partial = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + dims[None, :],
                              mask=is_piece[:, None], other=0.0)    # (BLOCK_S, HEAD_DIM)
            acc = acc * alpha + tl.sum(partial * weight[:, None], axis=0)
            l_i = l_i * alpha + tl.sum(weight, axis=0)
            m_i = m_new
        tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + dims,
                 (acc / l_i).to(out_ptr.dtype.element_ty))


_merge_launch = Launcher(_merge_pieces_kernel)


def merge_tile(num_splits: int) -> int:
    return min(MERGE_TILES[-1], max(MERGE_TILES[0], next_power_of_2(num_splits)))


def merge_pieces(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor,
                 seq_lens: torch.Tensor, pieces: Pieces | None, num_splits: int,
                 num_kv_heads: int, target_programs: int, align: int,
                 launch_options: dict) -> None:
    """Writes out[seq, head] for every sequence of more than one piece from the partials of its
    pieces: part_out (num_slots, num_heads, head_dim) and part_lse (num_slots, num_heads), fp32.
    pieces is None for a batch of one sequence only, whose quantum the kernel computes as the
    split kernel did (num_kv_heads, target_programs, align as given to it)."""
    num_seqs, num_heads, head_dim = out.shape
    first_slot, quantum = (seq_lens, seq_lens) if pieces is None else (pieces.first_slot,
                                                                       pieces.quantum)
    _merge_launch(
        (num_seqs, num_heads),
        part_out, part_lse, out, seq_lens, first_slot, quantum, out.stride(0), out.stride(1),
        num_splits, num_kv_heads, target_programs, align, HEAD_DIM=head_dim,
        BLOCK_S=merge_tile(num_splits), ONE_SEQ=pieces is None, num_warps=4, **launch_options)
