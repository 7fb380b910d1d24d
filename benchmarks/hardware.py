"""The hardware limits benchmarks compare against, measured in the same run."""

from __future__ import annotations

import torch
import triton


def median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def copy_rate_gbs() -> float:
    """HBM bandwidth from a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_us(lambda: dst.copy_(src)) / 1e3


def matmul_tflops(dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul rate, 8192^3."""
    a = torch.randn(8192, 8192, dtype=dtype, device="cuda")
    b = torch.randn_like(a)
    return 2 * 8192**3 / median_us(lambda: a @ b) / 1e6
