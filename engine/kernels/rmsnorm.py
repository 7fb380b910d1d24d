"""Triton kernel for RMSNorm fused with the residual add before it.

Same contract as `rms_norm_reference` in engine/layers.py: returns (norm(x + residual) * weight,
x + residual). A decoder layer does "add the residual, then normalize" twice; fusing the two reads
x and residual once and writes both outputs in the same pass, instead of a separate add kernel
and a norm kernel each going through memory (the fused-add-RMSNorm kernels of vLLM and
FlashInfer do the same).

To match the reference to the bit where it can, the kernel rounds exactly where the reference
does: the sum x + residual is rounded to the activation dtype (it is stored and becomes the next
residual), the normalized value is rounded to that dtype before the weight multiply, and only the
mean of squares is taken in fp32. One program normalizes one row; a hidden size up to a few
thousand fits in registers as a single tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.engine.kernels import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_residual, stride_out, stride_residual_out,
    hidden_size, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        summed = x.to(tl.float32) + residual.to(tl.float32)
        x = summed.to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_square = tl.sum(h * h, axis=0) / hidden_size
    normed = (h * tl.rsqrt(mean_square + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, out: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual) * weight, x + residual); x, residual: (..., hidden_size)."""
    hidden_size = x.shape[-1]
    rows = x.reshape(-1, hidden_size)                      # (num_rows, hidden_size)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype),
                          device=x.device)
    out_rows = out.view(-1, hidden_size)
    if residual is None:
        residual_rows, residual_out = rows, x
        residual_out_rows = rows
    else:
        residual_rows = residual.reshape(-1, hidden_size)
        if residual_rows.stride(-1) != 1:
            residual_rows = residual_rows.contiguous()
        residual_out = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
        residual_out_rows = residual_out.view(-1, hidden_size)
    num_rows = rows.shape[0]
    if num_rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden_size)
    _rms_norm_kernel[(num_rows,)](
        rows, residual_rows, weight, out_rows, residual_out_rows,
        rows.stride(0), residual_rows.stride(0), out_rows.stride(0), residual_out_rows.stride(0),
        hidden_size, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(max(block // 256, 1), 16), **pdl.launch_options(x),
    )
    return out, residual_out
