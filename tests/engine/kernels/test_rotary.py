"""Rotary embedding kernel against apply_rotary_reference, with llama3 scaled tables."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.layers import apply_rotary_reference, rope_cos_sin, rope_inv_freq

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (32, 8), (32, 4)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_matches_reference(num_heads, num_kv_heads, head_dim):
    from tandem.engine.kernels.rotary import apply_rotary

    cos, sin = rope_cos_sin(rope_inv_freq(head_dim, 500000.0, LLAMA3_SCALING), 16384, "cuda")
    num_tokens = 77
    # q and k as strided views into one fused QKV output, as the model produces them.
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=torch.bfloat16,
                      device="cuda")
    q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    v_before = qkv[:, num_heads + num_kv_heads:].clone()
    positions = torch.randint(0, 16384, (num_tokens,), device="cuda")
    ref_q, ref_k = apply_rotary_reference(q, k, positions, cos, sin)

    got_q, got_k = apply_rotary(q, k, positions, cos, sin)
    torch.testing.assert_close(got_q, ref_q)
    torch.testing.assert_close(got_k, ref_k)
    assert torch.equal(qkv[:, num_heads + num_kv_heads:], v_before)  # v untouched
