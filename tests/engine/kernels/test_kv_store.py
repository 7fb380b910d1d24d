"""store_kv kernel against store_kv_reference, padding slots included."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.attention import store_kv_reference
from tests.engine.kernels.paged_batch import make_paged_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("num_kv_heads,head_dim", [(8, 128), (4, 64), (1, 128), (6, 64)])
def test_store_kv_matches_reference_and_skips_padding(num_kv_heads, head_dim):
    from tandem.engine.kernels.kv_store import store_kv

    batch = make_paged_batch([40, 17, 100], [40, 5, 33], 8, num_kv_heads, head_dim)
    slots = batch.meta.slot_mapping.clone()
    slots[[0, 7, -1]] = -1  # padding tokens: first, middle and last
    num_tokens = slots.numel()
    # Strided key/value, as they come out of a fused QKV projection.
    kv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    key, value = kv[:, :num_kv_heads], kv[:, num_kv_heads:2 * num_kv_heads]
    expected = batch.kv_layer.clone()
    keep = slots >= 0
    store_kv_reference(key[keep], value[keep], expected, slots[keep])

    store_kv(key, value, batch.kv_layer, slots)
    assert torch.equal(batch.kv_layer, expected)


def test_store_kv_casts_to_cache_dtype():
    from tandem.engine.kernels.kv_store import store_kv

    batch = make_paged_batch([30], [30], 8, 8, 128)
    key = torch.randn(30, 8, 128, device="cuda")
    value = torch.randn(30, 8, 128, device="cuda")
    expected = batch.kv_layer.clone()
    store_kv_reference(key, value, expected, batch.meta.slot_mapping)
    store_kv(key, value, batch.kv_layer, batch.meta.slot_mapping)
    assert torch.equal(batch.kv_layer, expected)
