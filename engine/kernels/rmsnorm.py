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

x may also be a split-K matmul's PartialSums (kernels/partial_sums.py): the kernel adds the
splits in fp32 and rounds the total to the matmul's dtype, as the matmul would have, before the
residual add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.engine.kernels import pdl
from tandem.engine.kernels.host_math import next_power_of_2
from tandem.engine.kernels.partial_sums import PartialSums

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_part, stride_residual, stride_out, stride_residual_out,
    hidden_size, eps,
    HAS_RESIDUAL: tl.constexpr, WRITE_SUM: tl.constexpr, NUM_PARTS: tl.constexpr,
    X_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)  # never written: before the wait
    pdl.enter(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if NUM_PARTS > 1:  # split-K partial sums, fp32: their total is the matmul's output
        for part in tl.static_range(1, NUM_PARTS):
            x += tl.load(x_ptr + part * stride_part + row * stride_x + cols, mask=mask, other=0.0)
        x = x.to(X_DTYPE)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        summed = x.to(tl.float32) + residual.to(tl.float32)
        x = summed.to(residual_out_ptr.dtype.element_ty)
    if WRITE_SUM:
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_square = tl.sum(h * h, axis=0) / hidden_size
    normed = (h * tl.rsqrt(mean_square + eps)).to(x.dtype)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor | PartialSums, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, out: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual) * weight, x + residual); x, residual: (..., hidden_size), or x
    the PartialSums of (rows, hidden_size)."""
    hidden_size = x.shape[-1]
    if isinstance(x, PartialSums):
        parts, x_dtype = x.parts, x.dtype
        if parts.stride(-1) != 1:
            parts = parts.contiguous()
        rows, num_parts = parts[0], parts.shape[0]       # (num_rows, hidden_size) each
        stride_part = parts.stride(0)
    else:
        rows, num_parts, x_dtype, stride_part = x.reshape(-1, hidden_size), 1, x.dtype, 0
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
    device = rows.device
    sum_dtype = x_dtype if residual is None else torch.promote_types(x_dtype, residual.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype),
                          device=device)
    out_rows = out.view(-1, hidden_size)
    if residual is None:
        if num_parts > 1:  # x + 0 is the partials' total, which the kernel writes
            residual_out = torch.empty(x.shape, dtype=x_dtype, device=device)
            residual_rows, residual_out_rows = rows, residual_out.view(-1, hidden_size)
        else:
            residual_rows, residual_out = rows, x
            residual_out_rows = rows
    else:
        residual_rows = residual.reshape(-1, hidden_size)
        if residual_rows.stride(-1) != 1:
            residual_rows = residual_rows.contiguous()
        residual_out = torch.empty(x.shape, dtype=sum_dtype, device=device)
        residual_out_rows = residual_out.view(-1, hidden_size)
    num_rows = rows.shape[0]
    if num_rows == 0:
        return out, residual_out
    block = next_power_of_2(hidden_size)
    _rms_norm_kernel[(num_rows,)](
        rows, residual_rows, weight, out_rows, residual_out_rows,
        rows.stride(0), stride_part, residual_rows.stride(0), out_rows.stride(0),
        residual_out_rows.stride(0), hidden_size, eps,
        HAS_RESIDUAL=residual is not None, WRITE_SUM=residual is not None or num_parts > 1,
        NUM_PARTS=num_parts, X_DTYPE=_TL_DTYPES[x_dtype], BLOCK=block,
        num_warps=min(next_power_of_2(max(block * num_parts // 256, 1)), 16),
        **pdl.launch_options(rows),
    )
    return out, residual_out
