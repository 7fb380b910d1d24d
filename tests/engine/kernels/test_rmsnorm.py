"""Fused residual-add RMSNorm kernel against rms_norm_reference."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.layers import rms_norm_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("hidden_size", [4096, 2048, 1000])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_matches_reference(hidden_size, with_residual, dtype):
    from tandem.engine.kernels.rmsnorm import rms_norm

    x = torch.randn(3, 37, hidden_size, dtype=dtype, device="cuda")
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.randn(hidden_size, dtype=dtype, device="cuda")
    out = torch.full_like(x, float("nan"))
    got, got_residual = rms_norm(x, weight, 1e-5, residual, out=out)
    ref, ref_residual = rms_norm_reference(x, weight, 1e-5, residual)
    assert got is out and got.dtype == ref.dtype
    # The fp32 mean of squares is summed in another order than torch's, which can move the
    # normalized value by one ulp before the weight multiply rounds again: two ulps at most.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, ref, rtol=2 * eps, atol=1e-5)
    # x + residual is rounded once, the same way torch rounds it: bit-identical.
    assert torch.equal(got_residual, ref_residual)


def test_rms_norm_fp32_weight_promotes_like_the_reference():
    from tandem.engine.kernels.rmsnorm import rms_norm

    x = torch.randn(5, 512, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(512, device="cuda")
    got, _ = rms_norm(x, weight, 1e-6)
    ref, _ = rms_norm_reference(x, weight, 1e-6)
    assert got.dtype == ref.dtype == torch.float32
    # The normalized value is rounded to bf16 before the fp32 weight multiply, as in the reference.
    torch.testing.assert_close(got, ref, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-5)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("num_parts", [2, 3, 8])
def test_rms_norm_adds_up_split_k_partial_sums(with_residual, num_parts):
    # The total of the partials, rounded once to the matmul's dtype, then as for a tensor.
    from tandem.engine.kernels.partial_sums import PartialSums
    from tandem.engine.kernels.rmsnorm import rms_norm

    parts = torch.randn(num_parts, 5, 1024, device="cuda")
    x = PartialSums(parts, torch.bfloat16)
    residual = torch.randn(5, 1024, dtype=torch.bfloat16, device="cuda") if with_residual else None
    weight = torch.randn(1024, dtype=torch.bfloat16, device="cuda")
    got, got_residual = rms_norm(x, weight, 1e-6, residual)
    # fp32 sums in another order may round the total to a neighbouring bf16 value
    total = parts.sum(0).to(torch.bfloat16)
    ref, ref_residual = rms_norm_reference(total, weight, 1e-6, residual)
    assert got.shape == ref.shape == (5, 1024) and got_residual.dtype == torch.bfloat16
    torch.testing.assert_close(got_residual, ref_residual, rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=2 ** -6, atol=1e-5)
