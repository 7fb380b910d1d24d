"""Triton kernel for SwiGLU's activation, silu(gate) * up, in one pass.

Same contract as `silu_and_mul_reference` in engine/layers.py. Unfused, torch reads the gate for
silu, writes it, and reads it back with the up half for the product: three passes and two kernels
per layer where one pass suffices. The math is done in fp32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.engine.kernels import pdl
from tandem.engine.kernels.host_math import cdiv


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, intermediate,
                         BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0)
    out = gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (num_tokens, 2 * intermediate) with unit stride in the last dim."""
    num_tokens, width = x.shape
    if width % 2 or x.stride(-1) != 1:
        raise ValueError(f"expected (tokens, 2 * intermediate) contiguous rows, got {tuple(x.shape)}")
    intermediate = width // 2
    if out is None:
        out = torch.empty(num_tokens, intermediate, dtype=x.dtype, device=x.device)
    block = 1024
    grid = (num_tokens, cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), intermediate, BLOCK=block,
                               **pdl.launch_options(x))
    return out
