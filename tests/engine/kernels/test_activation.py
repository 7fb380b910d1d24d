"""The fused SiLU-and-multiply kernel against its torch reference."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.kernels import silu_and_mul
from tandem.engine.layers import silu_and_mul_reference


def test_cpu_falls_back_to_the_reference():
    x = torch.randn(3, 8)
    assert torch.equal(silu_and_mul(x), silu_and_mul_reference(x))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens, intermediate", [(1, 14336), (7, 3072), (300, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_reference(num_tokens, intermediate, dtype):
    from tandem.engine.kernels.activation import silu_and_mul as kernel
    for _ in range(2):  # fresh inputs each time
        x = torch.randn(num_tokens, 2 * intermediate, dtype=dtype, device="cuda") * 3
        out = torch.full((num_tokens, intermediate), float("nan"), dtype=dtype, device="cuda")
        kernel(x, out)
        expected = silu_and_mul_reference(x.float()).to(dtype)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
