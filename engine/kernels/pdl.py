"""Programmatic dependent launch (Hopper and later) for the engine's Triton kernels.

A decode step of a small model is hundreds of kernels of a few microseconds each, and between two
of them the device drains the first grid before it starts the second. Launched with
`launch_pdl=True`, a kernel's programs may start while the kernel before it on the stream is still
finishing; each then waits (`gdc_wait`, griddepcontrol.wait) until that kernel has completed and
its writes are visible, so the launch and the first loads' latency overlap the previous kernel's
tail. `gdc_launch_dependents` lets the next kernel do the same to this one.

The rule that keeps this correct: a kernel launched this way calls `enter` (or `wait`) before any
load or store of memory that an earlier kernel may write or read. Every entry kernel in
engine/kernels calls it (tests/engine/kernels/test_pdl.py checks the parameter), so the wait also
orders each kernel after everything before it: kernel n cannot finish before kernel n-1 has.
Work on memory no earlier kernel writes (a matmul's weights) may come before it, and so may reads
of what kernel n-2 or earlier wrote (a decode step's inputs: positions, slots, seq_lens, block
tables): kernel n starts only once kernel n-1 has passed its own wait, that is once kernel n-2 has
completed.

Used inside `programmatic_launches` only (the small decode graphs, engine/cuda_graphs.py); off on
CPUs, before Hopper, and with TANDEM_PDL=0. TANDEM_PDL=wait keeps the launches but drops
the skinny matmul's weight prefetch ahead of the wait (kernels/skinny_gemm.py); the engine
benchmark's A/B runs use both switches.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl


# Only decode graphs of up to this many sequences are captured with programmatic launches. Up to
# 16 the step measured 5-15% faster. On an H200 at 1k / 4k contexts, batch 32 gained 5.5% / 2.9%
# (qwen3-0.6b) and 1.8% / 1.0% (llama-3.1-8b), batch 64 5.9% / 2.3% and 0.0% / 0.4%, and batch
# 128 nothing (+0.2%: waiting programs hold SMs that the attention's many waves want). Eager steps
# launch plainly: host-bound, they gain nothing, and their kernel variants stay the ones compiled
# at start-up (a variant first met while serving would stop the batch to compile).
DECODE_MAX_BATCH = 64


class _Scope:
    depth = 0


_scope = _Scope()


@contextlib.contextmanager
def programmatic_launches(active: bool = True):
    """While active, kernels launch programmatically (graphs captured inside keep it so)."""
    _scope.depth += active
    try:
        yield
    finally:
        _scope.depth -= active


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(tensor: torch.Tensor) -> bool:
    """Whether kernels on this tensor's device launch with programmatic dependent launch."""
    # The scope first: eager steps launch outside it, and this runs on each of their launches.
    if not _scope.depth or not tensor.is_cuda or os.environ.get("TANDEM_PDL", "1") == "0":
        return False
    return _supported(tensor.device.index if tensor.device.index is not None
                      else torch.cuda.current_device())


def prefetch_weights(tensor: torch.Tensor) -> bool:
    """Whether a matmul asks L2 for its weights (the decode attention for its first KV tile)
    before waiting on the previous kernel."""
    return enabled(tensor) and os.environ.get("TANDEM_PDL", "1") != "wait"


def launch_options(tensor: torch.Tensor) -> dict:
    """Keyword arguments for a kernel launch: USE_PDL for the kernel, launch_pdl for Triton."""
    on = enabled(tensor)
    return {"USE_PDL": on, "launch_pdl": on}


@triton.jit
def prefetch_row_heads_l2(base_ptr, rows, stride_row, length, LINE: tl.constexpr,
                          LINES: tl.constexpr):
    """Asks L2 for the first LINES cache lines (LINE elements each) of each of `rows`, `length`
    elements long; loads nothing into registers. Only the heads: prefetching whole rows of a
    large matrix ahead of the loop evicts them again before use (the matmul then reads them
    twice), while the heads cover the loop's first tiles."""
    offsets = tl.minimum(tl.arange(0, LINES) * LINE, length - 1)
    addresses = base_ptr + rows[:, None].to(tl.int64) * stride_row + offsets[None, :]
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [addresses],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def enter(USE_PDL: tl.constexpr):
    """Wait for the previous kernel on the stream to complete, then let the next one launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait(USE_PDL: tl.constexpr):
    """`enter` without the early release: for a kernel of many waves that reads a lot, whose
    successor's programs would otherwise sit waiting on its SMs from its last wave on (the
    decode attention's merge did, and made the split 6% slower at batch 32). Call `release`
    after the program's last store."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
