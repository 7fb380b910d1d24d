"""The few-row matmul of skinny_gemm.py with the elementwise kernel before it folded into its
prologue: SiLU-and-mul before the down projection.

At a decode step the activation kernel is a launch of a microsecond or two over a few KB
(llama-3.1-8b at batch 1 on an H200: 32 launches, 47 us of a 4.64 ms step; a larger share for a
small model). A program of the skinny matmul reads the whole input rows anyway (it streams its
BLOCK_N rows of W along all of K), so it can as well read what the activation kernel would have
read and compute its input tile by tile: `skinny_silu_linear` takes gate and up from the gate_up
projection's output, rounds silu(gate) * up to the activation dtype and takes the dot with the
down projection's tile.

Rounding is the unfused kernel's: silu(gate) * up in fp32, rounded once to the activation dtype
by activation.py's own `silu_mul`. So the fused kernel equals the unfused pair bit for bit where
both take one config (same tiles, same dot order; the tests hold it to that).

Every program repeats the prologue, so it computes only the rows there are (to a power of two)
and repeats them to fill the 16 rows the tensor-core dot takes at least: at batch 1 that is one
row's exp and division per element where the whole tile would have taken 16 (the SFU's rate,
16 per clock per SM, would otherwise bound a narrow BLOCK_N). Padding rows of the dot's input
only reach output rows that are never stored.

Which is faster, fused or the unfused pair (the activation kernel, then whichever matmul
skinny_gemm.linear chose), depends on the shape: the prologue's work grows with the rows and is
repeated by every program. So it is measured as skinny_gemm.choose measures: once per shape, the
first time the shape is seen outside a CUDA-graph capture (the engine's eager warm-up before each
capture), each config of the fused kernel timed against the pair. Shapes first seen during a
capture, more than MAX_ROWS rows and other dtypes take the pair.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from tandem.engine.kernels import skinny_gemm
from tandem.engine.kernels.activation import silu_and_mul, silu_mul

Config = tuple[int, int, int, int]  # (BLOCK_N, BLOCK_K, num_warps, num_stages), skinny_gemm's
# Fused must take under 97% of the pair's time. The margin keeps timing noise from switching
# implementations between runs, as skinny_gemm's does, but the saving is one launch of a kernel
# of a microsecond or two, a few percent of a large matrix's matmul (llama-3.1-8b's down
# projection streams 117 MB, ~25 us): skinny_gemm's 10% would never let it win there.
_FUSED_MARGIN = 0.97
# skinny_gemm's configs, and one whose pipeline of two row tiles still fits at 33-64 rows, where
# none of those do.
CONFIGS = (*skinny_gemm.CONFIGS, (16, 128, 4, 4))


@triton.jit(do_not_specialize=["num_rows"])
def _silu_gemm_kernel(
    gate_up_ptr, w_ptr, bias_ptr, out_ptr, num_rows, K,
    stride_gate_up, stride_w, stride_out,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, PROLOGUE_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, PROLOGUE_M)
    ks = tl.arange(0, BLOCK_K)
    is_row = rows[:, None] < num_rows
    gate_tile = gate_up_ptr + rows[:, None] * stride_gate_up + ks[None, :]  # up is K further
    w_tile = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]  # (BLOCK_N, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):  # K is a multiple of BLOCK_K, N of BLOCK_N (see `fits`)
        gate = tl.load(gate_tile, mask=is_row, other=0.0)     # (PROLOGUE_M, BLOCK_K)
        up = tl.load(gate_tile + K, mask=is_row, other=0.0)
        x = silu_mul(gate, up).to(gate_up_ptr.dtype.element_ty)  # rounded as silu_and_mul's
        w = tl.load(w_tile)
        acc += tl.dot(_dot_rows(x, PROLOGUE_M, BLOCK_M, BLOCK_K), tl.trans(w))
        gate_tile += BLOCK_K
        w_tile += BLOCK_K
    _store_rows(acc, bias_ptr, out_ptr, cols, num_rows, stride_out, HAS_BIAS, BLOCK_M)


@triton.jit
def _dot_rows(x, PROLOGUE_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The prologue's rows x (PROLOGUE_M, BLOCK_K) as the dot's (BLOCK_M, BLOCK_K) operand, row m
    being x's row m % PROLOGUE_M: rows past the real ones are padding, whose outputs are never
    stored, so they may hold anything."""
    if PROLOGUE_M == 1:
        x = tl.broadcast_to(x, (BLOCK_M, BLOCK_K))
    elif PROLOGUE_M < BLOCK_M:
        copies = tl.broadcast_to(x[None, :, :], (BLOCK_M // PROLOGUE_M, PROLOGUE_M, BLOCK_K))
        x = tl.reshape(copies, (BLOCK_M, BLOCK_K))
    return x


@triton.jit
def _store_rows(acc, bias_ptr, out_ptr, cols, num_rows, stride_out,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols)[None, :].to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] < num_rows)


def fits(num_rows: int, weight: torch.Tensor, config: Config) -> bool:
    """skinny_gemm.fits with the prologue's two input tiles (gate, up) per pipeline stage."""
    return skinny_gemm.fits(num_rows, weight, config, input_tiles=2)


def skinny_silu_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       config: Config) -> torch.Tensor:
    """silu(gate) * up @ weight (N, K)^T + bias for gate_up (rows, 2 * K), gate first, rows <=
    MAX_ROWS; `fits` must hold."""
    num_rows, n, k = gate_up.shape[0], weight.shape[0], weight.shape[1]
    if gate_up.shape[1] != 2 * k or gate_up.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"skinny_silu_linear needs contiguous rows (rows, 2 * {k}), got "
                         f"{tuple(gate_up.shape)}")
    out = torch.empty((num_rows, n), dtype=gate_up.dtype, device=gate_up.device)
    block_n, block_k, num_warps, num_stages = config
    block_m, prologue_m = _block_rows(num_rows)
    _silu_gemm_kernel[(n // block_n,)](
        gate_up, weight, bias if bias is not None else weight, out, num_rows, k,
        gate_up.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, PROLOGUE_M=prologue_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _block_rows(num_rows: int) -> tuple[int, int]:
    """(BLOCK_M, PROLOGUE_M): the dot's rows (16 at least, for the tensor cores) and the rows the
    prologue computes (the rows to a power of two)."""
    prologue_m = triton.next_power_of_2(num_rows)
    return max(16, prologue_m), prologue_m


def silu_and_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                        ) -> torch.Tensor:
    """silu(gate) * up @ weight^T + bias for gate_up (tokens, 2 * K): the fused kernel where it
    was measured faster than the activation kernel and the matmul skinny_gemm.linear chose."""
    def unfused() -> torch.Tensor:
        return skinny_gemm.linear(silu_and_mul(gate_up), weight, bias)

    if not _may_fuse(gate_up, weight, bias):
        return unfused()
    key = ("silu", gate_up.shape[0], *weight.shape, weight.dtype, bias is not None)
    config = _chosen_config(key, lambda: _choose(
        gate_up.shape[0], weight, unfused,
        lambda c: functools.partial(skinny_silu_linear, gate_up, weight, bias, c)))
    return unfused() if config is None else skinny_silu_linear(gate_up, weight, bias, config)


_chosen: dict[tuple, Config | None] = {}


def _may_fuse(rows: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """A few 2-D rows, half-precision weights (as skinny_gemm takes), every input of one dtype
    and contiguous along its last axis."""
    inputs = [rows, weight, *(t for t in others if t is not None)]
    return (rows.dim() == 2 and 0 < rows.shape[0] <= skinny_gemm.MAX_ROWS
            and weight.dtype in skinny_gemm.HALF_DTYPES
            and all(t.dtype == weight.dtype and t.stride(-1) == 1 for t in inputs))


def _chosen_config(key: tuple, choose: Callable[[], Config | None]) -> Config | None:
    """The remembered choice for this shape; measured now if it has none, unless a CUDA graph is
    being captured (nothing can be timed then: the unfused pair, not remembered)."""
    if key not in _chosen:
        if torch.cuda.is_current_stream_capturing():
            return None
        _chosen[key] = choose()
    return _chosen[key]


def _choose(num_rows: int, weight: torch.Tensor, unfused: Callable[[], object],
            fused: Callable[[Config], Callable[[], object]]) -> Config | None:
    """The fastest fused config, or None where the unfused pair is (by the margin) faster."""
    candidates = ((config, fused(config)) for config in CONFIGS
                  if fits(num_rows, weight, config))
    return skinny_gemm.fastest(unfused, candidates, _FUSED_MARGIN)
