"""The kernel dispatch surface: CPU tensors take the torch references (CPU test); CUDA tensors
take the Triton kernels (GPU test)."""

from __future__ import annotations

import pytest
import torch

from tandem.engine import kernels
from tandem.engine.attention import paged_attention_reference, store_kv_reference
from tandem.engine.layers import (apply_rotary_reference, rms_norm_reference, rope_cos_sin,
                                  rope_inv_freq)
from tests.engine.kernels.paged_batch import make_paged_batch


def test_cpu_tensors_fall_back_to_the_references():
    batch = make_paged_batch([20, 9], [20, 1], 4, 2, 16, block_size=4, dtype=torch.float32,
                             device="cpu")
    scale = 0.25
    assert not kernels.is_triton_usable(batch.query)
    ref = paged_attention_reference(batch.query, batch.kv_layer, batch.meta, scale)
    assert torch.equal(kernels.paged_attention(batch.query, batch.kv_layer, batch.meta, scale),
                       ref)
    out = torch.full_like(batch.query, float("nan"))
    assert kernels.paged_attention(batch.query, batch.kv_layer, batch.meta, scale, out=out) is out
    assert torch.equal(out, ref)

    key, value = torch.randn(2, 21, 2, 16).unbind(0)
    slots = batch.meta.slot_mapping.clone()
    slots[3] = -1
    expected = batch.kv_layer.clone()
    keep = slots >= 0
    store_kv_reference(key[keep], value[keep], expected, slots[keep])
    kernels.store_kv(key, value, batch.kv_layer, slots)
    assert torch.equal(batch.kv_layer, expected)

    x, residual = torch.randn(2, 3, 64, dtype=torch.bfloat16).unbind(0)
    weight = torch.randn(64, dtype=torch.bfloat16)
    for got, want in zip(kernels.rms_norm(x, weight, 1e-5, residual),
                         rms_norm_reference(x, weight, 1e-5, residual)):
        assert torch.equal(got, want)

    cos, sin = rope_cos_sin(rope_inv_freq(16, 10000.0, None), 32, "cpu")
    q, k = torch.randn(21, 4, 16), torch.randn(21, 2, 16)
    positions = torch.randint(0, 32, (21,))
    for got, want in zip(kernels.apply_rotary(q, k, positions, cos, sin),
                         apply_rotary_reference(q, k, positions, cos, sin)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 30, 1]])
def test_cuda_tensors_take_the_kernels(query_lens):
    batch = make_paged_batch([500, 40, 3000], query_lens, 32, 8, 128)
    assert kernels.is_triton_usable(batch.query)
    got = kernels.paged_attention(batch.query, batch.kv_layer, batch.meta, 0.1)
    ref = paged_attention_reference(batch.query, batch.kv_layer, batch.meta, 0.1)
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def mixed_metadata(batch) -> None:
    """Give a paged batch whose one-token sequences come first the runner's mixed-step split."""
    from tandem.engine.model_runner import _mixed_split
    from tandem.engine.step_inputs import HostInputs

    meta = batch.meta
    host = HostInputs([], [], [], meta.query_start_loc_cpu, meta.seq_lens_cpu, [], [],
                      meta.max_query_len)
    meta.num_decode_seqs, meta.rest = _mixed_split(host, meta)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seq_lens,query_lens", [([500, 40, 3000, 700], [1, 1, 30, 200]),
                                                 ([500, 40, 3000, 700], [1, 2, 1, 1]),
                                                 ([20000, 9000, 3000, 700], [1, 1, 30, 200])])
def test_a_mixed_step_sends_its_leading_decodes_to_the_decode_kernel(seq_lens, query_lens):
    # the last case's long decode contexts take several splits
    batch = make_paged_batch(seq_lens, query_lens, 32, 8, 128)
    mixed_metadata(batch)
    assert batch.meta.num_decode_seqs == (2 if query_lens[1] == 1 else 1)
    got = kernels.paged_attention(batch.query, batch.kv_layer, batch.meta, 0.1)
    ref = paged_attention_reference(batch.query, batch.kv_layer, batch.meta, 0.1)
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    for row in range(batch.query.shape[0]):  # every row, decode and prompt alike
        err = (got[row].float() - ref[row].float()).norm() / ref[row].float().norm()
        assert err.item() < 2e-2, row


def test_decode_rows_go_first_in_a_mixed_step():
    from tandem.engine.model_runner import decode_rows_first
    from tandem.engine.scheduler import ScheduledBatch

    def order(num_new):
        return decode_rows_first(ScheduledBatch([object()] * len(num_new), num_new))

    assert order([5, 1, 7, 1]) == [1, 3, 0, 2]
    assert order([1, 1, 7]) is None      # already first
    assert order([1, 1]) is None         # decode only
    assert order([9, 4]) is None         # no decode rows


def test_a_mixed_step_slices_its_rows_once_for_every_layer(monkeypatch):
    # The kernels are stood in for: what matters is what each layer's launches are given.
    from tandem.engine.kernels import decode_attention, prefill_attention

    calls = []
    monkeypatch.setattr(kernels, "is_triton_usable", lambda tensor: True)
    monkeypatch.setattr(decode_attention, "decode_attention",
                        lambda q, kv, tables, lens, scale, out, longest, num_splits:
                        calls.append(("decode", q, out, tables, lens, longest, num_splits)))
    monkeypatch.setattr(prefill_attention, "prefill_attention",
                        lambda q, kv, meta, scale, out: calls.append(("prefill", q, out, meta)))
    batch = make_paged_batch([500, 9000, 3000], [1, 1, 30], 4, 2, 16, block_size=4,
                             dtype=torch.float32, device="cpu")
    mixed_metadata(batch)
    out = torch.empty_like(batch.query)
    for _ in range(3):   # three layers, one query and output buffer
        kernels.paged_attention(batch.query, batch.kv_layer, batch.meta, 0.1, out)
    decodes, prefills = calls[0::2], calls[1::2]
    assert all(call[1:] == decodes[0][1:] for call in decodes)   # the very same views
    assert all(call[1:] == prefills[0][1:] for call in prefills)
    _, q, dout, tables, lens, longest, splits = decodes[0]
    assert torch.equal(q, batch.query[:2]) and q.data_ptr() == batch.query.data_ptr()
    assert dout.data_ptr() == out.data_ptr() and torch.equal(lens, batch.meta.seq_lens[:2])
    assert torch.equal(tables, batch.meta.block_tables[:2])
    assert longest == 9000 and splits is None    # past the mixed split threshold
    assert prefills[0][1].data_ptr() == batch.query[2:].data_ptr()
    assert prefills[0][3] is batch.meta.rest
    other = torch.empty_like(out)                # another buffer: sliced again
    kernels.paged_attention(batch.query, batch.kv_layer, batch.meta, 0.1, other)
    assert calls[-2][2].data_ptr() == other.data_ptr()
