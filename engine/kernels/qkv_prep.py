"""Triton kernel that turns a fused QKV projection into attention's inputs in one pass: an
RMSNorm on each head of q and k (Qwen3's qk_norm; skipped for models without it), rotary on q and
k, and the new K and V written into the paged cache.

Same contract as `prepare_qkv_reference` in engine/layers.py, which composes the reference norm,
rotary and KV store. Unfused, a decode layer ran four to six small kernels here (two norms, each
after a copy that made its strided head view contiguous, rotary, the store), each a few
microseconds of launch and latency for a few kilobytes of work; at batch 1 that was about a fifth
of a small model's step. One program takes one token: it reads the token's cos/sin row once,
normalizes and rotates every q head in place in the QKV tensor (attention reads q from there),
and sends K and V straight to their cache slot; K is never written back, since attention reads it
from the cache. A negative slot (a padding row of a CUDA graph) stores nothing.

Rounding follows the references step by step: the norm's result is rounded to the activation dtype
before the weight multiply and again after it, and rotary works in fp32 on those values and rounds
once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.engine.kernels import pdl
from tandem.engine.kernels.host_math import next_power_of_2
from tandem.engine.kernels.rotary import load_rope_row, rotate_halves


@triton.jit
def norm_rotate(x_ptr, num_heads, weight_ptr, eps, cos1, cos2, sin1, sin2,
                 HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """Rotated (and normalized) halves of `num_heads` contiguous heads at x_ptr, each
    (BLOCK_H, HALF), in the activation dtype."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    first = x_ptr + heads * (2 * HALF) + dims
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        mean_square = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
        scale = tl.rsqrt(mean_square + eps)[:, None]
        w1 = tl.load(weight_ptr + dims).to(tl.float32)
        w2 = tl.load(weight_ptr + HALF + dims).to(tl.float32)
        x1 = ((x1 * scale).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * scale).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    out1, out2 = rotate_halves(x1, x2, cos1, cos2, sin1, sin2)
    return out1.to(dtype), out2.to(dtype)


@triton.jit
def _qkv_prep_kernel(
    qkv_ptr, positions_ptr, cos_ptr, sin_ptr, q_weight_ptr, k_weight_ptr, cache_ptr, slot_ptr,
    stride_qkv, stride_cos, stride_sin,
    stride_cache_block, stride_cache_kv, stride_cache_slot, stride_cache_head,
    eps, num_heads, num_kv_heads,
    HAS_NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_KV_H: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_PDL: tl.constexpr,
):
    # Ahead of the wait: positions and slots are the step's inputs, written before the kernel two
    # back completed, and the rotary tables are never written (kernels/pdl.py).
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)[None, :]
    cos1, cos2, sin1, sin2 = load_rope_row(cos_ptr, sin_ptr, position, stride_cos, stride_sin,
                                           HALF)
    pdl.enter(USE_PDL)
    row = qkv_ptr + token * stride_qkv

    q1, q2 = norm_rotate(row, num_heads, q_weight_ptr, eps, cos1, cos2, sin1, sin2,
                          HAS_NORM, BLOCK_H, HALF)
    heads = tl.arange(0, BLOCK_H)[:, None]
    q_dst = row + heads * (2 * HALF) + dims
    tl.store(q_dst, q1, mask=heads < num_heads)
    tl.store(q_dst + HALF, q2, mask=heads < num_heads)

    k_row = row + num_heads * (2 * HALF)
    k1, k2 = norm_rotate(k_row, num_kv_heads, k_weight_ptr, eps, cos1, cos2, sin1, sin2,
                          HAS_NORM, BLOCK_KV_H, HALF)
    kv_heads = tl.arange(0, BLOCK_KV_H)[:, None]
    # A padding token (slot < 0) gets zero live heads: one straight-line path for every program.
    live = kv_heads < tl.where(slot >= 0, num_kv_heads, 0)
    dst = (cache_ptr + (slot // BLOCK_SIZE) * stride_cache_block
           + (slot % BLOCK_SIZE) * stride_cache_slot + kv_heads * stride_cache_head + dims)
    cache_dtype = cache_ptr.dtype.element_ty
    tl.store(dst, k1.to(cache_dtype), mask=live)
    tl.store(dst + HALF, k2.to(cache_dtype), mask=live)
    v_src = k_row + num_kv_heads * (2 * HALF) + kv_heads * (2 * HALF) + dims
    v1 = tl.load(v_src, mask=live, other=0.0)
    v2 = tl.load(v_src + HALF, mask=live, other=0.0)
    tl.store(dst + stride_cache_kv, v1.to(cache_dtype), mask=live)
    tl.store(dst + stride_cache_kv + HALF, v2.to(cache_dtype), mask=live)


def prepare_qkv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                kv_layer: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv: (num_tokens, (num_heads + 2 * num_kv_heads) * head_dim), rows contiguous. Normalizes
    (when q_weight is given) and rotates q in place, stores K and V at slot_mapping; returns q as a
    (num_tokens, num_heads, head_dim) view of qkv."""
    num_tokens = qkv.shape[0]
    half = head_dim // 2
    if head_dim % 2 or half & (half - 1):
        raise ValueError(f"prepare_qkv needs head_dim = 2 * a power of two, got {head_dim}")
    if qkv.stride(-1) != 1 or kv_layer.stride(-1) != 1 or cos.stride(-1) != 1:
        raise ValueError("prepare_qkv needs the last axis of qkv, the cache and cos/sin contiguous")
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    if num_tokens == 0:
        return q
    has_norm = q_weight is not None
    _qkv_prep_kernel[(num_tokens,)](
        qkv, positions, cos, sin, q_weight if has_norm else qkv, k_weight if has_norm else qkv,
        kv_layer, slot_mapping,
        qkv.stride(0), cos.stride(0), sin.stride(0),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        eps, num_heads, num_kv_heads,
        HAS_NORM=has_norm, HALF=half,
        BLOCK_H=next_power_of_2(num_heads),
        BLOCK_KV_H=next_power_of_2(num_kv_heads),
        BLOCK_SIZE=kv_layer.shape[2],
        num_warps=4, **pdl.launch_options(qkv),
    )
    return q
