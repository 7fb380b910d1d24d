"""The skinny matmul with a fused prologue (SiLU-and-mul) against the torch reference and against
the unfused pair of kernels it replaces; the measured choice; CUDA graphs.

On a CPU the kernels run in Triton's interpreter, in fp16 (the interpreter's bf16 dot multiplies
raw bit patterns and its bf16 rounding truncates), each check in a fresh python: the interpreter
patches triton.language for the whole process, which would break compiling for a GPU after it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.engine.layers import silu_and_mul_reference

REPO = Path(__file__).resolve().parents[3]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _silu_linear_reference(gate_up, weight, bias):
    """The unfused path's math: the activation rounded to its dtype, then an fp32-accumulated
    matmul."""
    out = silu_and_mul_reference(gate_up).float() @ weight.float().T
    return out + bias.float() if bias is not None else out


def _inputs(num_rows, n, k, dtype, device, gate_up=False, with_bias=False):
    """(rows, weight, bias) with rows of 2 * k columns for gate_up, else k; seeded."""
    torch.manual_seed(num_rows * 7 + n)
    rows = torch.randn(num_rows, 2 * k if gate_up else k, device=device) * 2
    weight = torch.randn(n, k, device=device) * 0.05
    bias = torch.randn(n, device=device) if with_bias else None
    return rows.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _identity(k, dtype, device):
    return torch.eye(k, dtype=dtype, device=device)


def check_silu_linear(dtype=torch.float16, device="cpu", n=64, k=256,
                      row_counts=(1, 3, 16, 20)) -> None:
    """Bit for bit the activation kernel then skinny_linear with the same config; near the
    reference."""
    from tandem.engine.kernels.activation import silu_and_mul
    from tandem.engine.kernels.skinny_fused import CONFIGS, fits, skinny_silu_linear
    from tandem.engine.kernels.skinny_gemm import skinny_linear

    for num_rows in row_counts:
        for with_bias in (False, True):
            gate_up, weight, bias = _inputs(num_rows, n, k, dtype, device, True, with_bias)
            want = _silu_linear_reference(gate_up, weight, bias)
            configs = [c for c in CONFIGS if fits(num_rows, weight, c)]
            assert configs, num_rows
            for config in configs:
                got = skinny_silu_linear(gate_up, weight, bias, config)
                assert got.shape == (num_rows, n) and got.dtype == dtype
                pair = skinny_linear(silu_and_mul(gate_up), weight, bias, config)
                assert torch.equal(got, pair), (num_rows, config)
                assert _relative_error(got, want) < 1e-2, (num_rows, config)
            # Through an identity the output is the prologue's activation itself.
            activation = skinny_silu_linear(gate_up, _identity(k, dtype, device), None, configs[0])
            assert torch.equal(activation, silu_and_mul(gate_up))
            # The reference rounds silu(gate) before the product too: one ulp apart at most.
            torch.testing.assert_close(activation, silu_and_mul_reference(gate_up),
                                       rtol=torch.finfo(dtype).eps, atol=1e-5)


def _interpreted(check: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    code = f"from tests.engine.kernels.test_skinny_fused import {check}; {check}()"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]


@pytest.mark.parametrize("check", ["check_silu_linear"])
def test_interpreted_on_cpu(check):
    _interpreted(check)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("check", [check_silu_linear])
def test_on_gpu(check, dtype):
    # llama-3.1-8b's down projection is 4096 x 14336; a narrower one keeps the test short.
    check(dtype, "cuda", n=1536, k=2048, row_counts=(1, 2, 5, 16, 33, 64))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_rows", [1, 8, 32])
def test_choice_is_measured_once_and_matches_the_pair(num_rows):
    from tandem.engine.kernels import skinny_fused
    from tandem.engine.kernels.activation import silu_and_mul
    from tandem.engine.kernels.skinny_gemm import linear

    gate_up, down, _ = _inputs(num_rows, 1024, 3072, torch.bfloat16, "cuda", gate_up=True)
    got = skinny_fused.silu_and_mul_linear(gate_up, down, None)
    assert ("silu", num_rows, 1024, 3072, torch.bfloat16, False) in skinny_fused._chosen
    assert _relative_error(got, linear(silu_and_mul(gate_up), down, None)) < 2e-3


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_the_fused_kernels(monkeypatch):
    from tandem.engine.kernels import skinny_fused
    from tandem.engine.kernels.activation import silu_and_mul

    num_rows, hidden, inter = 4, 1024, 2048
    gate_up, down, _ = _inputs(num_rows, hidden, inter, torch.bfloat16, "cuda", gate_up=True)
    config = (16, 256, 4, 4)  # fused, whatever this GPU would measure
    monkeypatch.setattr(skinny_fused, "_chosen", {
        ("silu", num_rows, hidden, inter, torch.bfloat16, False): config})

    def fused_step():
        return (skinny_fused.silu_and_mul_linear(gate_up, down, None),)

    def unseen_pair():  # a shape first seen in a capture takes the pair and is not measured
        return torch.nn.functional.linear(silu_and_mul(gate_up[:3]), down)

    fused_step()
    unseen_pair()  # compiles the activation kernel and warms cuBLAS outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fused_step()
        static_unseen = skinny_fused.silu_and_mul_linear(gate_up[:3], down, None)
    assert len(skinny_fused._chosen) == 1
    for t in (gate_up,):
        t.copy_(torch.randn_like(t))
    graph.replay()
    for got, want in zip(static, fused_step()):
        assert torch.equal(got, want)
    assert _relative_error(static_unseen, unseen_pair()) < 2e-3
