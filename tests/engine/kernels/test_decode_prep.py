"""The decode attention that prepares q and stores the new K/V itself, against prepare_qkv and
the decode attention apart: the same bits in the cache, and the output within rounding."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.attention import paged_attention_reference
from tandem.engine.layers import prepare_qkv_reference, rope_cos_sin, rope_inv_freq
from tests.engine.kernels.paged_batch import make_paged_batch, relative_error


def _inputs(seq_lens, num_heads, num_kv_heads, head_dim, norm, device, dtype):
    batch = make_paged_batch(seq_lens, [1] * len(seq_lens), num_heads, num_kv_heads, head_dim,
                             device=device, dtype=dtype)
    qkv = torch.randn(len(seq_lens), (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype,
                      device=device)
    positions = torch.tensor([n - 1 for n in seq_lens], device=device)
    cos, sin = rope_cos_sin(rope_inv_freq(head_dim, 10000.0, None), max(seq_lens) + 8, device)
    weights = [torch.rand(head_dim, dtype=dtype, device=device) + 0.5 if norm else None
               for _ in range(2)]
    return batch, qkv, positions, cos, sin, weights


def test_cpu_runs_the_references():
    from tandem.engine.kernels import prepare_and_attend

    batch, qkv, positions, cos, sin, (qw, kw) = _inputs([5, 40], 8, 4, 32, True, "cpu",
                                                        torch.float32)
    cache = batch.kv_layer.clone()
    got = prepare_and_attend(qkv.clone(), positions, cos, sin, qw, kw, 1e-6, cache, batch.meta,
                             32 ** -0.5, 8, 4, 32)
    ref_cache = batch.kv_layer.clone()
    q = prepare_qkv_reference(qkv.clone(), positions, cos, sin, qw, kw, 1e-6, ref_cache,
                              batch.meta.slot_mapping, 8, 4, 32)
    assert torch.equal(got, paged_attention_reference(q, ref_cache, batch.meta, 32 ** -0.5))
    assert torch.equal(cache, ref_cache)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (16, 8, 128),
                                                             (8, 8, 64), (16, 4, 32)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("num_splits", [None, 1, 5, 16])
def test_the_same_cache_and_output_as_prepare_qkv_then_decode_attention(num_heads, num_kv_heads, head_dim,
                                                            norm, num_splits):
    from tandem.engine.kernels.decode_attention import QKVPrep, decode_attention
    from tandem.engine.kernels.qkv_prep import prepare_qkv

    seq_lens = [1, 15, 16, 17, 64, 65, 300, 1000, 2000]
    batch, qkv, positions, cos, sin, (qw, kw) = _inputs(seq_lens, num_heads, num_kv_heads,
                                                        head_dim, norm, "cuda", torch.bfloat16)
    meta, scale = batch.meta, head_dim ** -0.5
    slots = meta.slot_mapping.clone()
    slots[-1] = -1   # a padding row: stores nothing
    apart_cache, apart_qkv = batch.kv_layer.clone(), qkv.clone()
    q = prepare_qkv(apart_qkv, positions, cos, sin, qw, kw, 1e-6, apart_cache, slots, num_heads,
                    num_kv_heads, head_dim)
    apart = torch.empty(len(seq_lens), num_heads, head_dim, dtype=qkv.dtype, device="cuda")
    decode_attention(q, apart_cache, meta.block_tables, meta.seq_lens, scale, apart,
                     meta.max_seq_len, num_splits=num_splits)
    fused_cache, fused_qkv = batch.kv_layer.clone(), qkv.clone()
    fused = torch.full_like(apart, float("nan"))
    decode_attention(fused_qkv, fused_cache, meta.block_tables, meta.seq_lens, scale, fused,
                     meta.max_seq_len, num_splits=num_splits,
                     prep=QKVPrep(positions, cos, sin, qw, kw, 1e-6, slots))
    assert torch.equal(fused_qkv, qkv)                  # left as it was
    assert torch.equal(fused_cache, apart_cache)
    # The padding row read an unwritten slot. The rest may differ by rounding: the compiler
    # fuses the q rotation's multiply-adds differently in the two kernels, so an element of q can
    # differ in its last bf16 bit (the interpreter, which fuses none, gives the same bits), and on
    # an H200 the outputs of long contexts then differed by a few bits. Both stay as close to the
    # float64 reference.
    assert relative_error(fused[:-1], apart[:-1]) < 5e-3
    ref_cache = batch.kv_layer.clone()
    q_ref = prepare_qkv_reference(qkv.clone(), positions, cos, sin, qw, kw, 1e-6, ref_cache,
                                  slots, num_heads, num_kv_heads, head_dim)
    ref = paged_attention_reference(q_ref, ref_cache, meta, scale)
    assert relative_error(fused[:-1], ref[:-1]) < 1e-2
