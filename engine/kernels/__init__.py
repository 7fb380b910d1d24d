"""The engine's kernel surface: each function runs a Triton kernel on CUDA tensors and the torch
reference from engine/attention.py or engine/layers.py everywhere else.

The model calls only these (plus `is_triton_usable`). Each Triton module imports triton at
its top, so they are imported here lazily, on the first CUDA call: importing this package works on
a CPU machine with no triton installed, where every call takes the reference path. Results agree
with the references to bf16 rounding; the tests in tests/engine/kernels/ hold them to it.

One difference from the references: on CUDA, `apply_rotary` rotates q and k in place. Always use the
tensors it returns.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from tandem.engine.attention import (AttentionMetadata, paged_attention_reference,
                                     store_kv_reference)
from tandem.engine.kernels.partial_sums import PartialSums
from tandem.engine.layers import (apply_rotary_reference, prepare_qkv_reference,
                                  rms_norm_reference, silu_and_mul_reference)

__all__ = ["PartialSums", "apply_rotary", "is_triton_usable", "linear", "paged_attention",
           "prepare_and_attend", "prepare_qkv", "rms_norm", "silu_and_mul", "store_kv", "swiglu"]


@functools.lru_cache(maxsize=1)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def is_triton_usable(tensor: torch.Tensor) -> bool:
    """True when `tensor` lives on a CUDA device and triton can be imported."""
    return tensor.is_cuda and _has_triton()


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_layer: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key, value (num_tokens, num_kv_heads, head_dim) at slot_mapping; slots < 0 are
    padding and skipped."""
    if not is_triton_usable(kv_layer):
        keep = slot_mapping >= 0  # the reference has no notion of padding slots
        store_kv_reference(key[keep], value[keep], kv_layer, slot_mapping[keep])
        return
    from tandem.engine.kernels.kv_store import store_kv as store_kv_triton
    store_kv_triton(key, value, kv_layer, slot_mapping)


# Past this many tokens in a mixed step's longest decode context its decode rows are split. On an
# H200, qwen3-0.6b, a chunk beside 1-13 decodes of 20k tokens each: 13.4-24.9 ms in one split,
# 7.4-21.6 split; of 600 tokens: 5.8-12.5 ms in one, 7.2-12.5 split (the merge's launches).
# Every split count's variants are compiled at start-up (decode_attention.compile_variants).
_MIXED_SPLIT_CONTEXT = 8192


def paged_attention(query: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                    scale: float, out: torch.Tensor | None = None,
                    num_splits: int | None = None) -> torch.Tensor:
    """Causal attention of query (num_tokens, num_heads, head_dim) over the paged context.

    Decode-only batches take the split-KV decode kernel (num_splits: see
    decode_attention.choose_num_splits; fix it when capturing a CUDA graph), others the prefill
    kernel, but for the leading one-token sequences of a mixed step whose metadata has `rest`,
    which take the decode kernel. Writes into `out` when given.
    """
    if not is_triton_usable(query):
        result = paged_attention_reference(query, kv_layer, meta, scale)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty_like(query)
    from tandem.engine.kernels.decode_attention import decode_attention
    from tandem.engine.kernels.prefill_attention import prefill_attention
    if meta.is_decode_only:
        return decode_attention(query, kv_layer, meta.block_tables, meta.seq_lens, scale, out,
                                meta.max_seq_len, num_splits=num_splits or meta.num_splits,
                                pieces=None if num_splits else meta.pieces)
    if meta.rest is not None:
        # A mixed step: its leading one-token rows by the decode kernel (the prefill kernel would
        # give each a whole query tile and read its context once per query head). Split as a
        # decode step would be where a context is long: the two kernels run one after the other,
        # and in one split the longest context alone decides the decode part. Short ones keep one
        # split, whose step is host-bound (eager launches) and gains nothing from the merge.
        views = meta.mixed_views
        if views is None or views[0] is not query or views[1] is not out:
            views = meta.mixed_views = _mixed_views(query, out, meta)
        _, _, decode_q, decode_out, rest_q, rest_out, tables, lens, longest = views
        decode_attention(decode_q, kv_layer, tables, lens, scale, decode_out, longest,
                         num_splits=None if longest > _MIXED_SPLIT_CONTEXT else 1)
        prefill_attention(rest_q, kv_layer, meta.rest, scale, rest_out)
        return out
    return prefill_attention(query, kv_layer, meta, scale, out)


def _mixed_views(query: torch.Tensor, out: torch.Tensor, meta: AttentionMetadata) -> tuple:
    """(query, out, the decode rows' query and output, the rest's query and output, the decode
    rows' block tables and lengths, their longest context): sliced again for every layer, these
    cost an eager step's host about as much as a launch."""
    d = meta.num_decode_seqs
    return (query, out, query[:d], out[:d], query[d:], out[d:], meta.block_tables[:d],
            meta.seq_lens[:d], max(meta.seq_lens_cpu[:d]))


def rms_norm(x: torch.Tensor | PartialSums, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual) * weight, x + residual); residual None means zero. x may be
    the PartialSums of `linear(..., partial=True)` (CUDA only)."""
    if not isinstance(x, PartialSums) and not is_triton_usable(x):
        return rms_norm_reference(x, weight, eps, residual)
    from tandem.engine.kernels.rmsnorm import rms_norm as rms_norm_triton
    return rms_norm_triton(x, weight, eps, residual)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (num_tokens, num_heads, head_dim) and k (num_tokens, num_kv_heads,
    head_dim) at `positions`; in place on CUDA, so use the returned tensors."""
    if not is_triton_usable(q):
        return apply_rotary_reference(q, k, positions, cos, sin)
    from tandem.engine.kernels.rotary import apply_rotary as apply_rotary_triton
    return apply_rotary_triton(q, k, positions, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = (num_tokens, 2 * intermediate), gate first."""
    if not is_triton_usable(x):
        return silu_and_mul_reference(x)
    from tandem.engine.kernels.activation import silu_and_mul as silu_and_mul_triton
    return silu_and_mul_triton(x)


def swiglu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for weight = gate over up, (2 * intermediate, hidden): the
    gate/up projection and `silu_and_mul` in one. On CUDA a decode step's few rows may take one
    Triton kernel for both (kernels/skinny_gemm.py), where that was measured faster."""
    if not is_triton_usable(x):
        return silu_and_mul_reference(torch.nn.functional.linear(x, weight))
    from tandem.engine.kernels.skinny_gemm import swiglu as swiglu_triton
    return swiglu_triton(x, weight)


def prepare_qkv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                kv_layer: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """From a fused QKV output (num_tokens, (heads + 2 * kv_heads) * head_dim): q and k normalized
    per head when the weights are given (Qwen3) and rotated, K and V stored at slot_mapping (slots
    < 0 skipped); returns q (num_tokens, heads, head_dim). On CUDA q is rotated in place in qkv."""
    if not is_triton_usable(qkv):
        return prepare_qkv_reference(qkv, positions, cos, sin, q_weight, k_weight, eps, kv_layer,
                                     slot_mapping, num_heads, num_kv_heads, head_dim)
    from tandem.engine.kernels.qkv_prep import prepare_qkv as prepare_qkv_triton
    return prepare_qkv_triton(qkv, positions, cos, sin, q_weight, k_weight, eps, kv_layer,
                              slot_mapping, num_heads, num_kv_heads, head_dim)


# A few sequences' decode step is a chain of latency-bound kernels, and one kernel fewer saves
# its latency (qwen3-0.6b batch 1 on an H200: 0.93 -> 0.90 ms at 1k, 1.06 -> 1.03 at 4k). Past
# that the step is bandwidth-bound, and each program's store and barrier before it reads the
# cache cost 1-2% (batch 32-256 at 1k, both models, in the same device call).
_FUSED_PREP_ROWS = 16


def prepare_and_attend(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, q_weight: torch.Tensor | None,
                       k_weight: torch.Tensor | None, eps: float, kv_layer: torch.Tensor,
                       meta: AttentionMetadata, scale: float, num_heads: int, num_kv_heads: int,
                       head_dim: int) -> torch.Tensor:
    """`prepare_qkv` then `paged_attention`: attention's output (num_tokens, heads, head_dim)
    from a fused QKV projection. On CUDA a decode-only step of up to _FUSED_PREP_ROWS sequences
    does both in the decode attention's split kernel (kernels/decode_attention.py), one kernel
    fewer a layer; qkv is then left as it was, where `prepare_qkv` rotates q in place."""
    if (not is_triton_usable(qkv) or not meta.is_decode_only
            or qkv.shape[0] > _FUSED_PREP_ROWS):
        q = prepare_qkv(qkv, positions, cos, sin, q_weight, k_weight, eps, kv_layer,
                        meta.slot_mapping, num_heads, num_kv_heads, head_dim)
        return paged_attention(q, kv_layer, meta, scale)
    from tandem.engine.kernels.decode_attention import QKVPrep, decode_attention
    out = torch.empty((qkv.shape[0], num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    prep = QKVPrep(positions, cos, sin, q_weight, k_weight, eps, meta.slot_mapping)
    return decode_attention(qkv, kv_layer, meta.block_tables, meta.seq_lens, scale, out,
                            meta.max_seq_len, num_splits=meta.num_splits, prep=prep,
                            pieces=meta.pieces)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           partial: bool = False) -> torch.Tensor | PartialSums:
    """x @ weight^T + bias. On CUDA, a few rows (a decode step) may take the Triton skinny matmul
    where it was measured faster than cuBLAS for that shape (kernels/skinny_gemm.py). With
    `partial`, for a result that only `rms_norm` reads, that matmul may split K and return its
    PartialSums of x as (rows, K) for rms_norm to add up."""
    if not is_triton_usable(x):
        return torch.nn.functional.linear(x, weight, bias)
    from tandem.engine.kernels.skinny_gemm import linear as skinny_or_cublas
    return skinny_or_cublas(x, weight, bias, partial)
