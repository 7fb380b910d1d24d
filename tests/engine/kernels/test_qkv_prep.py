"""Fused qk-norm + rotary + KV store kernel against prepare_qkv_reference."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.layers import prepare_qkv_reference, rope_cos_sin, rope_inv_freq

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _inputs(num_heads: int, num_kv_heads: int, head_dim: int, qk_norm: bool,
            num_tokens: int = 53, block_size: int = 16, device: str = "cuda"):
    cos, sin = rope_cos_sin(rope_inv_freq(head_dim, 1e6, None), 8192, device)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, dtype=torch.bfloat16, device=device)
    positions = torch.randint(0, 8192, (num_tokens,), device=device)
    weights = ((torch.rand(head_dim, device=device) + 0.5).to(torch.bfloat16),
               (torch.rand(head_dim, device=device) + 0.5).to(torch.bfloat16)) if qk_norm \
        else (None, None)
    num_blocks = 2 * num_tokens // block_size + 4
    # One layer of a three-layer cache: the layer view is strided, as in the engine.
    cache = torch.randn(num_blocks, 3, 2, block_size, num_kv_heads, head_dim,
                        dtype=torch.bfloat16, device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[::7] = -1  # padding rows store nothing
    return qkv, positions, cos, sin, weights, cache, slots


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(16, 8, 128), (32, 8, 128),
                                                             (14, 2, 64)])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_prepare_qkv_matches_reference(num_heads, num_kv_heads, head_dim, qk_norm):
    from tandem.engine.kernels.qkv_prep import prepare_qkv

    qkv, positions, cos, sin, (q_w, k_w), cache, slots = _inputs(num_heads, num_kv_heads,
                                                                 head_dim, qk_norm)
    expected_cache = cache.clone()
    ref_q = prepare_qkv_reference(qkv.clone(), positions, cos, sin, q_w, k_w, 1e-6,
                                  expected_cache[:, 1], slots, num_heads, num_kv_heads, head_dim)
    got_q = prepare_qkv(qkv, positions, cos, sin, q_w, k_w, 1e-6, cache[:, 1], slots, num_heads,
                        num_kv_heads, head_dim)
    # bf16 rounded twice (norm, then weight) before rotary: an ulp apart here and there.
    assert _relative_error(got_q, ref_q) < 1e-2
    assert got_q.data_ptr() == qkv.data_ptr()            # q rotated in place, a view of qkv
    written = torch.zeros(cache[:, 1, 0].shape[:2], dtype=torch.bool, device=cache.device)
    live = slots[slots >= 0]
    written.view(-1)[live] = True                         # (blocks, block_size) slots stored
    assert torch.equal(cache[~written.any(dim=1)], expected_cache[~written.any(dim=1)])
    assert torch.equal(cache[:, [0, 2]], expected_cache[:, [0, 2]])  # other layers untouched
    for kv in (0, 1):
        assert _relative_error(cache[:, 1, kv][written], expected_cache[:, 1, kv][written]) < 1e-2
    assert torch.equal(cache[:, 1, 1][written], expected_cache[:, 1, 1][written])  # V is a copy


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()
