"""A matmul's output left as split-K partial sums for the kernel that reads it next.

A decode step's few-row matmul has one program per tile of output columns. Where a matrix has few
columns (the output and down projections, whose N is the hidden size: 1024 for qwen3-0.6b) that is
fewer programs than SMs, and the matmul reads its weights at a fraction of HBM bandwidth. Splitting
K gives each column tile several programs; their fp32 partial sums are added by the next kernel,
which for these two matmuls is always the residual-add RMSNorm, instead of by a reduction kernel of
their own, whose launch would cost about what the split saved.

No triton here: the dispatch in kernels/__init__.py checks for this type on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PartialSums:
    """parts (splits, rows, N) fp32; their sum, rounded to `dtype`, is the matmul's output."""
    parts: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.parts.shape[1:]

    def total(self) -> torch.Tensor:
        """The matmul's output itself (tests, and any reader other than rms_norm)."""
        return self.parts.sum(0).to(self.dtype)
