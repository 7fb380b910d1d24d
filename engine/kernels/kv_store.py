"""Triton kernel that writes one step's new K/V into the paged cache.

Same contract as `store_kv_reference` in engine/attention.py: token t's key and value go to slot
`slot_mapping[t]` (= block_id * block_size + offset) of the layer view
`[num_blocks, 2, block_size, num_kv_heads, head_dim]`. A negative slot marks a padding token (a
batch padded up to a captured CUDA-graph size) and is skipped, so padded rows never touch a block
that a live sequence owns.

One program per token moves all heads of that token: a token's K (or V) row is
`num_kv_heads * head_dim` elements, contiguous in the cache, so the store is one wide coalesced
write. The layer view is not contiguous (the layer axis sits between blocks), hence every cache
stride is passed in; block offsets are computed in int64 because a whole cache easily exceeds 2**31
elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.engine.kernels import pdl
from tandem.engine.kernels.host_math import next_power_of_2


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    stride_key_token, stride_key_head, stride_value_token, stride_value_head,
    stride_cache_block, stride_cache_kv, stride_cache_slot, stride_cache_head,
    num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.enter(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    # A padding token (slot < 0) gets zero live heads: it folds into the mask rather than an
    # early exit, so every program runs the same straight-line code.
    num_live_heads = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (heads[:, None] < num_live_heads) & (dims[None, :] < head_dim)

    key = tl.load(key_ptr + token * stride_key_token + heads[:, None] * stride_key_head
                  + dims[None, :], mask=mask)                 # (BLOCK_H, BLOCK_D)
    value = tl.load(value_ptr + token * stride_value_token + heads[:, None] * stride_value_head
                    + dims[None, :], mask=mask)

    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dst = (cache_ptr + block_id * stride_cache_block + offset * stride_cache_slot
           + heads[:, None] * stride_cache_head + dims[None, :])
    cache_dtype = cache_ptr.dtype.element_ty
    tl.store(dst, key.to(cache_dtype), mask=mask)
    tl.store(dst + stride_cache_kv, value.to(cache_dtype), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key, value (num_tokens, num_kv_heads, head_dim) into kv_layer at slot_mapping."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if key.stride(-1) != 1 or value.stride(-1) != 1 or kv_layer.stride(-1) != 1:
        raise ValueError("store_kv needs the head_dim axis of key, value and the cache contiguous")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, kv_layer, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
        num_kv_heads, head_dim,
        BLOCK_SIZE=kv_layer.shape[2],
        BLOCK_H=next_power_of_2(num_kv_heads),
        BLOCK_D=next_power_of_2(head_dim),
        num_warps=4, **pdl.launch_options(kv_layer),
    )
