"""Programmatic dependent launch: every Triton kernel takes the switch to wait before touching
what the kernel before it wrote, and a captured chain of kernels gives the same bits with it as
without."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch


def _entry_kernels():
    import triton

    import tandem.engine.kernels as package
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                yield f"{info.name}.{name}", value


def test_every_launched_kernel_takes_the_pdl_switch():
    kernels = dict(_entry_kernels())
    assert len(kernels) >= 9, sorted(kernels)
    missing = [name for name, kernel in kernels.items()
               if "USE_PDL" not in {param.name for param in kernel.params}]
    assert not missing


def test_off_without_cuda(monkeypatch):
    from tandem.engine.kernels import pdl
    assert pdl.launch_options(torch.zeros(1)) == {"USE_PDL": False, "launch_pdl": False}
    assert not pdl.prefetch_weights(torch.zeros(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["1", "wait"])
def test_a_captured_chain_matches_the_unlaunched_one(monkeypatch, mode):
    # norm -> skinny matmul -> SiLU-and-mul -> skinny matmul -> norm, replayed from a CUDA graph
    # with PDL on new inputs each time, against the same kernels launched plainly.
    from tandem.engine.kernels import pdl
    from tandem.engine.kernels.activation import silu_and_mul
    from tandem.engine.kernels.rmsnorm import rms_norm
    from tandem.engine.kernels.skinny_gemm import skinny_linear

    torch.manual_seed(0)
    hidden, inter = 1024, 3072
    norm_w = torch.rand(hidden, dtype=torch.bfloat16, device="cuda") + 0.5
    up = torch.randn(2 * inter, hidden, dtype=torch.bfloat16, device="cuda") * 0.03
    down = torch.randn(hidden, inter, dtype=torch.bfloat16, device="cuda") * 0.03
    x = torch.randn(4, hidden, dtype=torch.bfloat16, device="cuda")
    residual = torch.randn(4, hidden, dtype=torch.bfloat16, device="cuda")

    def chain():
        h, res = rms_norm(x, norm_w, 1e-6, residual)
        for _ in range(4):
            h = skinny_linear(silu_and_mul(skinny_linear(h, up, None, (16, 256, 4, 4))), down,
                              None, (16, 256, 4, 4))
            h, res = rms_norm(h, norm_w, 1e-6, res)
        return h, res

    monkeypatch.setenv("TANDEM_PDL", "0")
    inputs = [(torch.randn_like(x), torch.randn_like(residual)) for _ in range(3)]
    want = []
    for new_x, new_residual in inputs:
        x.copy_(new_x)
        residual.copy_(new_residual)
        want.append([t.clone() for t in chain()])
    monkeypatch.setenv("TANDEM_PDL", mode)
    with pdl.programmatic_launches():
        chain()  # compiles the PDL variants outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            out = chain()
    torch.cuda.current_stream().wait_stream(stream)
    for (new_x, new_residual), expected in zip(inputs, want):
        x.copy_(new_x)
        residual.copy_(new_residual)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


def test_only_inside_the_scope(monkeypatch):
    from tandem.engine.kernels import pdl
    monkeypatch.setattr(pdl, "_supported", lambda index: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda_like = torch.zeros(1)
    monkeypatch.setattr(type(cuda_like), "is_cuda", property(lambda self: True))
    monkeypatch.setenv("TANDEM_PDL", "1")
    assert not pdl.enabled(cuda_like)            # eager steps launch plainly
    with pdl.programmatic_launches():
        assert pdl.enabled(cuda_like)
        with pdl.programmatic_launches(False):
            assert pdl.enabled(cuda_like)
        monkeypatch.setenv("TANDEM_PDL", "0")
        assert not pdl.enabled(cuda_like)
    with pdl.programmatic_launches(False):
        assert not pdl.enabled(cuda_like)
