"""Triton kernel for rotary position embedding, applied to q and k in place.

Same contract as `apply_rotary_reference` in engine/layers.py (HF's rotate-half convention:
the first and second halves of head_dim form the rotated pairs, RoFormer / GPT-NeoX style), with
the cos/sin tables from `rope_cos_sin`. Each program takes one token, looks up its position's cos
and sin row once and rotates every q and k head of that token with it; q and k usually are strided
views into one fused QKV projection output, so rotating them in place saves two allocations and a
copy per layer.

Math is fp32 and each result is rounded once to the activation dtype, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.engine.kernels import pdl
from tandem.engine.kernels.host_math import next_power_of_2


@triton.jit
def load_rope_row(cos_ptr, sin_ptr, position, stride_cos, stride_sin, HALF: tl.constexpr):
    """The cos and sin rows at `position`, each as its two halves, (1, HALF) fp32. Both halves are
    read, as the reference multiplies by whole rows, rather than assuming the table repeats itself
    (rope_cos_sin's tables do, others need not)."""
    dims = tl.arange(0, HALF)[None, :]
    cos1 = tl.load(cos_ptr + position * stride_cos + dims).to(tl.float32)
    cos2 = tl.load(cos_ptr + position * stride_cos + HALF + dims).to(tl.float32)
    sin1 = tl.load(sin_ptr + position * stride_sin + dims).to(tl.float32)
    sin2 = tl.load(sin_ptr + position * stride_sin + HALF + dims).to(tl.float32)
    return cos1, cos2, sin1, sin2


@triton.jit
def rotate_halves(x1, x2, cos1, cos2, sin1, sin2):
    """x * cos + rotate_half(x) * sin, as its two halves: rotate_half(x) = cat(-x2, x1)."""
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


@triton.jit
def _rotate_heads(x_ptr, stride_head, num_heads, cos1, cos2, sin1, sin2,
                  BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    first = x_ptr + heads * stride_head + dims             # (BLOCK_H, HALF) pointers
    x1 = tl.load(first, mask=mask).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask).to(tl.float32)
    out1, out2 = rotate_halves(x1, x2, cos1, cos2, sin1, sin2)
    dtype = x_ptr.dtype.element_ty
    tl.store(first, out1.to(dtype), mask=mask)
    tl.store(first + HALF, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_cos, stride_sin,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV_H: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.enter(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos1, cos2, sin1, sin2 = load_rope_row(cos_ptr, sin_ptr, position, stride_cos, stride_sin,
                                           HALF)
    _rotate_heads(q_ptr + token * stride_q_token, stride_q_head, num_heads,
                  cos1, cos2, sin1, sin2, BLOCK_H, HALF)
    _rotate_heads(k_ptr + token * stride_k_token, stride_k_head, num_kv_heads,
                  cos1, cos2, sin1, sin2, BLOCK_KV_H, HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (num_tokens, num_heads, head_dim) and k (num_tokens, num_kv_heads, head_dim) in
    place by the cos/sin rows (max_positions, head_dim) at `positions`; returns (q, k)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    if head_dim % 2 or half & (half - 1):
        raise ValueError(f"apply_rotary needs head_dim = 2 * a power of two, got {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("apply_rotary needs the last axis of q, k, cos and sin contiguous")
    if num_tokens == 0:
        return q, k
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        num_heads, num_kv_heads,
        HALF=half,
        BLOCK_H=next_power_of_2(num_heads),
        BLOCK_KV_H=next_power_of_2(num_kv_heads),
        num_warps=4, **pdl.launch_options(q),
    )
    return q, k
