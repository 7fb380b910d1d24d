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
