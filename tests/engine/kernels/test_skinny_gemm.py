"""Skinny matmul kernel against a float64 matmul, and the measured choice against cuBLAS."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("num_rows", [1, 5, 16, 33, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_skinny_linear_matches_float64(num_rows, with_bias):
    from tandem.engine.kernels.skinny_gemm import _CONFIGS, fits, skinny_linear

    x = torch.randn(num_rows, 2048, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(1536, 2048, dtype=torch.bfloat16, device="cuda") * 0.02
    bias = torch.randn(1536, dtype=torch.bfloat16, device="cuda") if with_bias else None
    want = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    configs = [c for c in _CONFIGS if fits(num_rows, weight, c)]
    assert configs
    for config in configs:
        got = skinny_linear(x, weight, bias, config)
        assert got.shape == (num_rows, 1536) and got.dtype == torch.bfloat16
        assert _relative_error(got, want) < 1e-2, config


def test_linear_dispatch_agrees_with_cublas_and_remembers_its_choice():
    from tandem.engine.kernels import skinny_gemm

    weight = torch.randn(6144, 1024, dtype=torch.bfloat16, device="cuda") * 0.02
    for num_rows in (1, 8, 32, 100):
        x = torch.randn(num_rows, 1024, dtype=torch.bfloat16, device="cuda")
        want = torch.nn.functional.linear(x, weight, None)
        got = skinny_gemm.linear(x, weight, None)
        assert _relative_error(got, want.double()) < 1e-2
    assert (1, 6144, 1024, torch.bfloat16, False, "out") in skinny_gemm._chosen
    # past MAX_ROWS: cuBLAS, untimed
    assert (100, 6144, 1024, torch.bfloat16, False, "out") not in skinny_gemm._chosen


def test_serving_takes_the_nearest_measured_choice_without_timing(monkeypatch):
    from tandem.engine.kernels import skinny_gemm

    weight = torch.randn(4096, 1024, dtype=torch.bfloat16, device="cuda") * 0.02
    with skinny_gemm.allow_timing():
        skinny_gemm.linear(torch.randn(16, 1024, dtype=torch.bfloat16, device="cuda"), weight, None)
    monkeypatch.setattr(skinny_gemm._timing, "serving", True)
    monkeypatch.setattr(skinny_gemm, "choose", lambda *args: pytest.fail("timed while serving"))
    x = torch.randn(11, 1024, dtype=torch.bfloat16, device="cuda")
    got = skinny_gemm.linear(x, weight, None)
    assert _relative_error(got, torch.nn.functional.linear(x, weight, None).double()) < 1e-2
    key = (11, 4096, 1024, torch.bfloat16, False, "out")
    assert skinny_gemm._chosen[key] == skinny_gemm._chosen[(16, *key[1:])]


def test_with_pdl_a_row_tile_of_16_always_takes_triton(monkeypatch):
    # Up to 16 rows the matmul keeps the programmatic launch chain (kernels/pdl.py) whatever
    # cuBLAS takes alone; past that, cuBLAS is timed against it.
    from tandem.engine.kernels import skinny_gemm

    monkeypatch.setenv("TANDEM_PDL", "1")
    with skinny_gemm.pdl.programmatic_launches():
        if not skinny_gemm.pdl.enabled(torch.zeros(1, device="cuda")):
            pytest.skip("programmatic dependent launch needs Hopper or later")
        weight = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda") * 0.02
        for num_rows in (1, 16):
            x = torch.randn(num_rows, 4096, dtype=torch.bfloat16, device="cuda")
            assert skinny_gemm.choose(x, weight, None) is not None


@pytest.mark.parametrize("num_rows", [1, 7, 16])
def test_split_k_partial_sums_add_up_to_the_matmul(num_rows):
    from tandem.engine.kernels.partial_sums import PartialSums
    from tandem.engine.kernels.skinny_gemm import _CONFIGS, _SPLITS, fits, skinny_linear

    x = torch.randn(num_rows, 3072, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(1024, 3072, dtype=torch.bfloat16, device="cuda") * 0.02
    want = x.double() @ weight.double().T
    choices = [(*c, s) for c in _CONFIGS for s in _SPLITS if fits(num_rows, weight, (*c, s))]
    assert {c[4] for c in choices} == {2, 4, 8}
    for choice in choices:
        got = skinny_linear(x, weight, None, choice)
        assert isinstance(got, PartialSums) and got.parts.shape == (choice[4], num_rows, 1024)
        assert got.parts.dtype == torch.float32 and got.shape == (num_rows, 1024)
        assert _relative_error(got.total(), want) < 1e-2, choice


def test_split_k_is_a_candidate_only_for_partial_results():
    from tandem.engine.kernels.skinny_gemm import candidates

    weight = torch.empty(1024, 3072, dtype=torch.bfloat16, device="cuda")
    assert {c[4] for c in candidates(1, weight, "partial")} == {1, 2, 4, 8}
    assert {c[4] for c in candidates(1, weight, "out")} == {1}
    assert {c[4] for c in candidates(32, weight, "partial")} == {1, 2, 4, 8}
    x = torch.randn(3, 3072, dtype=torch.bfloat16, device="cuda")
    got = skinny_linear_through_dispatch(x, weight.normal_(0, 0.02))
    want = torch.nn.functional.linear(x, weight, None)
    assert _relative_error(got, want.double()) < 1e-2


def skinny_linear_through_dispatch(x, weight):
    """linear(partial=True), its result added up as the RMSNorm would."""
    from tandem.engine.kernels import skinny_gemm
    from tandem.engine.kernels.partial_sums import PartialSums

    out = skinny_gemm.linear(x, weight, None, partial=True)
    return out.total() if isinstance(out, PartialSums) else out


@pytest.mark.parametrize("num_rows", [1, 5, 16, 33])
def test_gated_kernel_is_the_matmul_then_the_activation_bit_for_bit(num_rows):
    # Each half is rounded as the matmul would store it, so the fused kernel is the unfused pair.
    from tandem.engine.kernels.activation import silu_and_mul
    from tandem.engine.kernels.skinny_gemm import _CONFIGS, _GATED_CONFIGS, fits, skinny_linear
    from tandem.engine.layers import silu_and_mul_reference

    x = torch.randn(num_rows, 1024, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(2 * 3072, 1024, dtype=torch.bfloat16, device="cuda") * 0.05
    configs = [c for c in (*_GATED_CONFIGS, *_CONFIGS) if fits(num_rows, weight, c, gated=True)]
    assert configs
    want = silu_and_mul_reference((x.double() @ weight.double().T).float()).double()
    for config in configs:
        got = skinny_linear(x, weight, None, config, gated=True)
        assert got.shape == (num_rows, 3072) and got.dtype == torch.bfloat16
        assert torch.equal(got, silu_and_mul(skinny_linear(x, weight, None, config))), config
        assert _relative_error(got, want) < 1e-2, config


def test_swiglu_dispatch_agrees_with_cublas_and_the_activation():
    from tandem.engine.kernels import skinny_gemm
    from tandem.engine.layers import silu_and_mul_reference

    weight = torch.randn(2 * 3072, 1024, dtype=torch.bfloat16, device="cuda") * 0.05
    assert {c[4] for c in skinny_gemm.candidates(1, weight, "swiglu")} == {1}
    for num_rows in (1, 8, 32, 100):
        x = torch.randn(num_rows, 1024, dtype=torch.bfloat16, device="cuda")
        want = silu_and_mul_reference(torch.nn.functional.linear(x, weight))
        got = skinny_gemm.swiglu(x, weight)
        assert got.shape == (num_rows, 3072)
        assert _relative_error(got, want.double()) < 1e-2
    assert (1, 6144, 1024, torch.bfloat16, False, "swiglu") in skinny_gemm._chosen
