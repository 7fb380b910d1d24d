"""Triton matmul for the few-row case of a linear layer, y = x @ W^T (+ bias), and the choice
between it and cuBLAS.

A decode step multiplies a handful of rows (one per sequence) by each weight matrix, so its speed
is the weight bytes over HBM bandwidth. For a large model's matrices cuBLAS gets there (95% of
the copy rate for llama-3.1-8b on an H200). For a small model's it does not: the tiles it picks
for qwen3-0.6b at batch 1 leave most SMs idle (gate_up, 12.6 MB, took 12.4 us: 1 TB/s). Here one
program owns `BLOCK_N` output columns and streams their rows of W along K; the rows of x ride
along, padded to 16 for the tensor-core dot. With small BLOCK_N there are enough programs to keep
every SM's loads in flight.

Which of the two is faster depends on the shape and the GPU, so it is measured, not guessed:
`choose` times cuBLAS and each candidate config once per (rows, N, K) shape, as a captured graph of
back-to-back calls on weights that miss the L2 cache (how a decode step runs them), the first time
the shape is seen outside a CUDA-graph capture (the engine's eager warm-up before each capture),
and keeps the fastest; Triton must win by a margin, so that timing noise does not switch
implementations between runs. Shapes first seen during a capture, and row counts past
MAX_ROWS, take cuBLAS.

For SwiGLU's gate/up projection (`swiglu`) the kernel applies the activation itself: each program
streams a tile of gate columns and the matching tile of up columns side by side and stores
silu(gate) * up, one kernel fewer a layer than the matmul and kernels/activation.py. Both halves
are rounded to the weight's dtype first, as the two kernels would store them, so the result is
the same bits as theirs.

Where the caller lets the result stay as partial sums (`linear(..., partial=True)`: the output
and down projections, read only by the residual-add RMSNorm), the candidates also split K in 2,
4 or 8 (kernels/partial_sums.py): more programs for a matrix with few columns.

Once an engine serves (`serve_without_timing`, after its graphs are captured), nothing is timed or
compiled any more: a row count first seen in an eager step (the sampled rows of a mixed step, a
short prompt) takes the choice made for the nearest measured row count with the same row tile
(BLOCK_M), or cuBLAS where there is none. Timing a shape costs tens of milliseconds and a new
row count could compile new variants, a stall for every sequence of the batch; the kernel does
not specialize on the row count, so one variant per config serves them all.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from tandem.engine.kernels import pdl
from tandem.engine.kernels.host_math import next_power_of_2
from tandem.engine.kernels.partial_sums import PartialSums

MAX_ROWS = 64       # past this a step is compute-heavy enough for cuBLAS's large tiles
_MARGIN = 0.9       # Triton is chosen only when it takes under 90% of cuBLAS's time
_HALF_DTYPES = (torch.bfloat16, torch.float16)
# Up to one 16-row tile the matmul is all weight bytes, and with programmatic dependent launch
# (kernels/pdl.py) the Triton kernel both streams them and keeps its neighbours overlapped, which a
# cuBLAS kernel in the chain would break: the batch-1 step measured faster with Triton for every
# matrix (llama-3.1-8b and qwen3-0.6b on H200, benchmarks/RESULTS.md), also where cuBLAS timed
# alone was faster. Past it, cuBLAS is timed against it as usual.
_CHAIN_ROWS = 16
_SHARED_BYTES = 160 * 1024  # of an H100/H200 SM's 227 KiB, with room for the compiler's own
# (BLOCK_N, BLOCK_K, num_warps, num_stages): narrow column tiles for many programs, deep
# pipelines for many loads in flight.
_CONFIGS = ((16, 256, 4, 4), (32, 256, 4, 4), (32, 128, 4, 5), (64, 128, 4, 4), (16, 512, 4, 3))
# The gated kernel's: two weight tiles a stage, so shallower or narrower in K than _CONFIGS to keep
# two programs an SM (the fastest per shape on H200: qwen3-0.6b's gate/up at 1-16 rows
# (32, 128, 4, 6), llama-3.1-8b's (32, 256, 4, 3), 32 rows (16, 128, 4, 4)).
_GATED_CONFIGS = ((32, 128, 4, 6), (32, 128, 4, 5), (32, 256, 4, 3), (16, 128, 4, 4))
# K split this many ways, tried where the column tiles alone are few programs (each count tried
# compiles a norm variant at start-up; 3 and 6 were tried on H200 and never chosen)
_SPLITS = (2, 4, 8)


@triton.jit(do_not_specialize=["num_rows"])
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, num_rows, k_per_split, up_row,
    stride_x, stride_w, stride_out, stride_split,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    # Program (column tile, split): the split's slice of K. With one split out_ptr is the output;
    # with more, an fp32 buffer of one (rows, N) slab of partial sums per split. GATED: the tile's
    # columns are gate rows of W, and the up rows they pair with start at W's row up_row.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.multiple_of(tl.program_id(1) * k_per_split, BLOCK_K)  # aligned, vector loads
    up_offset = up_row.to(tl.int64) * stride_w
    if PREFETCH:  # the weights: no earlier kernel writes them, so they need not wait
        pdl.prefetch_row_heads_l2(w_ptr + k_start, cols, stride_w, k_per_split, LINE=64,
                                  LINES=8)  # 128 B lines
        if GATED:
            pdl.prefetch_row_heads_l2(w_ptr + up_offset + k_start, cols, stride_w, k_per_split,
                                      LINE=64, LINES=8)
    if GATED:  # the down projection's programs would sit on SMs its later waves want
        pdl.wait(USE_PDL)
    else:
        pdl.enter(USE_PDL)
    rows = tl.arange(0, BLOCK_M)
    ks = k_start + tl.arange(0, BLOCK_K)
    is_row = rows[:, None] < num_rows
    x_tile = x_ptr + rows[:, None] * stride_x + ks[None, :]          # (BLOCK_M, BLOCK_K)
    w_tile = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]  # (BLOCK_N, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):  # a multiple of BLOCK_K, N of BLOCK_N (`fits`)
        x = tl.load(x_tile, mask=is_row, other=0.0)
        w = tl.load(w_tile)
        acc += tl.dot(x, tl.trans(w))
        if GATED:
            up_acc += tl.dot(x, tl.trans(tl.load(w_tile + up_offset)))
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    if HAS_BIAS:  # only ever with one split
        acc += tl.load(bias_ptr + cols)[None, :].to(tl.float32)
    if GATED:  # each half rounded as a stored matmul result would be, then kernels/activation.py
        gate = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = up_acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = gate / (1.0 + tl.exp(-gate)) * up
    out_ptr += tl.program_id(1) * stride_split
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=is_row)
    if GATED:
        pdl.release(USE_PDL)


# A choice: (BLOCK_N, BLOCK_K, num_warps, num_stages, splits of K).
Choice = tuple[int, int, int, int, int]


def fits(num_rows: int, weight: torch.Tensor, config: tuple[int, ...], gated: bool = False
         ) -> bool:
    """Whether the config (a _CONFIGS entry or a Choice) tiles this shape exactly and its
    pipeline fits in shared memory; `gated`: as `swiglu` runs it (gate and up tiles, one split)."""
    n, k = weight.shape
    block_n, block_k, _, num_stages = config[:4]
    splits = config[4] if len(config) > 4 else 1
    block_m = _row_tile(num_rows)
    stage_bytes = (block_m + (2 if gated else 1) * block_n) * block_k * weight.element_size()
    return (0 < num_rows <= MAX_ROWS and n % ((2 if gated else 1) * block_n) == 0
            and k % (block_k * splits) == 0 and not (gated and splits > 1)
            and stage_bytes * num_stages <= _SHARED_BYTES)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  config: tuple[int, ...], gated: bool = False) -> torch.Tensor | PartialSums:
    """x (rows, K) @ weight (N, K)^T + bias, rows <= MAX_ROWS; `fits` must hold. A Choice with
    more than one split of K returns PartialSums (and takes no bias). `gated`: weight is gate
    over up, (2 * I, K), and the result silu(x @ gate^T) * (x @ up^T), (rows, I)."""
    block_n, block_k, num_warps, num_stages = config[:4]
    splits = config[4] if len(config) > 4 else 1
    num_rows, (n, k) = x.shape[0], weight.shape
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("skinny_linear needs the K axis of x and weight contiguous")
    if splits > 1 and (bias is not None or gated):
        raise ValueError("a split-K matmul takes no bias and applies no activation")
    if gated:
        n //= 2
    out = torch.empty((splits, num_rows, n), dtype=x.dtype if splits == 1 else torch.float32,
                      device=x.device)
    _skinny_gemm_kernel[(n // block_n, splits)](
        x, weight, bias if bias is not None else weight, out, num_rows, k // splits, n,
        x.stride(0), weight.stride(0), out.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, GATED=gated, BLOCK_M=_row_tile(num_rows),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        PREFETCH=pdl.prefetch_weights(x), **pdl.launch_options(x),
    )
    return out[0] if splits == 1 else PartialSums(out, x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           partial: bool = False) -> torch.Tensor | PartialSums:
    """x (..., K) @ weight^T + bias through whichever of cuBLAS and skinny_linear was measured
    faster for this shape. With `partial`, a split-K matmul is among the candidates and its
    result comes back as PartialSums of x as (rows, K)."""
    rows = x.reshape(-1, x.shape[-1])
    # fp32 stays with cuBLAS: Triton's dot would take it through tf32.
    if rows.shape[0] > MAX_ROWS or rows.stride(-1) != 1 or weight.dtype not in _HALF_DTYPES:
        return torch.nn.functional.linear(x, weight, bias)
    partial = partial and bias is None
    config = _choice(rows, weight, bias, "partial" if partial else "out")
    if config is None:
        return torch.nn.functional.linear(x, weight, bias)
    out = skinny_linear(rows, weight, bias, config)
    return out if isinstance(out, PartialSums) else out.view(*x.shape[:-1], weight.shape[0])


def swiglu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for x (rows, K) and weight gate over up, (2 * I, K): the
    gated kernel where it was measured faster than cuBLAS and the activation kernel."""
    from tandem.engine.kernels.activation import silu_and_mul

    rows_ok = x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.stride(-1) == 1
    config = (_choice(x, weight, None, "swiglu") if rows_ok and weight.dtype in _HALF_DTYPES
              else None)
    if config is None:
        return silu_and_mul(torch.nn.functional.linear(x, weight))
    return skinny_linear(x, weight, None, config, gated=True)


def _choice(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            output: str) -> Choice | None:
    """The Choice for this shape and output ("out", "partial" or "swiglu"), timed the first time
    it is seen where timing is allowed; None is cuBLAS."""
    key = (rows.shape[0], weight.shape[0], weight.shape[1], weight.dtype, bias is not None,
           output)
    config = _chosen.get(key)
    if config is None and key not in _chosen:
        if torch.cuda.is_current_stream_capturing():
            config = nearest_choice(key)   # no timing inside a capture; timed at the next chance
        elif _timing.serving and not _timing.depth:
            config = _chosen[key] = nearest_choice(key)
        else:
            config = _chosen[key] = choose(rows, weight, bias, output)
    return config


_chosen: dict[tuple, Choice | None] = {}


class _Timing:
    serving = False   # an engine is serving: no more timing unless inside allow_timing()
    depth = 0


_timing = _Timing()


def serve_without_timing() -> None:
    """From now on, row counts not seen yet borrow a measured choice instead of being timed."""
    _timing.serving = True


@contextlib.contextmanager
def allow_timing():
    """Shapes may be timed inside: an engine's warm-up and graph capture."""
    _timing.depth += 1
    try:
        yield
    finally:
        _timing.depth -= 1


def _row_tile(num_rows: int) -> int:
    return max(16, next_power_of_2(num_rows))


def nearest_choice(key: tuple) -> Choice | None:
    """The choice measured for the nearest row count with the same row tile and the same weight;
    None (cuBLAS) when there is none."""
    num_rows, rest = key[0], key[1:]
    measured = [(abs(rows - num_rows), rows, config) for (rows, *other), config in _chosen.items()
                if tuple(other) == rest and _row_tile(rows) == _row_tile(num_rows)]
    return min(measured)[2] if measured else None


def candidates(num_rows: int, weight: torch.Tensor, output: str = "out") -> list[Choice]:
    """The Choices that fit this shape: each config whole, and for a "partial" output split in K
    where its column tiles alone give fewer than two programs an SM (the RMSNorm after it reads
    the partial sums, splits x rows x N x 4 bytes, with one program a row; `choose` times the two
    together, and where cuBLAS is timed too, it is timed with that norm as well)."""
    sms = torch.cuda.get_device_properties(weight.device).multi_processor_count
    gated = output == "swiglu"
    found = []
    for config in _GATED_CONFIGS if gated else _CONFIGS:
        programs = weight.shape[0] // config[0]
        splits = (1, *(s for s in _SPLITS if programs < 2 * sms)) if output == "partial" else (1,)
        found += [(*config, s) for s in splits if fits(num_rows, weight, (*config, s), gated)]
    return found


def choose(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           output: str = "out") -> Choice | None:
    """The fastest Choice for this shape, or None where cuBLAS is (by the margin) faster. A
    "partial" output is timed with the RMSNorm that reads it, since partial sums cost that norm
    more reads than they may save the matmul; a "swiglu" one against cuBLAS followed by the
    activation kernel."""
    copies = _cold_copies(weight)
    then = _norm_reading(x.shape[0], weight) if output == "partial" else _as_is
    if x.shape[0] <= _CHAIN_ROWS and pdl.enabled(x):
        best, best_s = None, float("inf")   # Triton whatever cuBLAS takes alone
    else:
        finish = _activation if output == "swiglu" else then
        best, best_s = None, _time_s(
            lambda w: finish(torch.nn.functional.linear(x, w, bias)), copies) * _MARGIN
    for config in candidates(x.shape[0], weight, output):
        try:
            seconds = _time_s(functools.partial(_skinny_on, x, bias, config, output == "swiglu",
                                                then), copies)
        except triton.runtime.errors.OutOfResources:
            continue  # a smaller GPU than the configs were sized for
        if seconds < best_s:
            best, best_s = config, seconds
    return best


def _skinny_on(x: torch.Tensor, bias: torch.Tensor | None, config: Choice, gated: bool, then,
               weight: torch.Tensor):
    return then(skinny_linear(x, weight, bias, config, gated))


def _as_is(out):
    return out


def _activation(out):
    from tandem.engine.kernels.activation import silu_and_mul
    return silu_and_mul(out)


def _norm_reading(num_rows: int, weight: torch.Tensor):
    """The residual-add RMSNorm of a decoder layer, applied to a (num_rows, N) result."""
    from tandem.engine.kernels.rmsnorm import rms_norm

    norm_weight = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)
    residual = torch.zeros((num_rows, weight.shape[0]), dtype=weight.dtype, device=weight.device)
    return lambda out: rms_norm(out, norm_weight, 1e-6, residual)


def _time_s(fn, copies: list[torch.Tensor], repeats: int = 5) -> float:
    """Median device time per call of fn(copy), the calls back to back in one captured graph.

    That is how a decode step runs them: replayed from a graph, each kernel right after another,
    where a programmatically launched kernel starts under the previous one's tail (kernels/pdl.py),
    which a kernel timed alone between two events never shows. Each call reads its own copy of
    the weight, so every weight comes from HBM as in a step, not from the L2 cache.
    """
    fn(copies[0])  # compiles a Triton config, warms cuBLAS, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for weight in copies:
            fn(weight)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(copies))
    return sorted(times)[len(times) // 2]


def _cold_copies(weight: torch.Tensor, most: int = 64) -> list[torch.Tensor]:
    """Copies of the weight that together pass twice the L2 cache (at least 4, at most `most`),
    so a graph cycling through them finds none in the cache; a weight larger than the cache
    evicts itself and is used as it is."""
    l2_bytes = torch.cuda.get_device_properties(weight.device).L2_cache_size
    weight_bytes = weight.numel() * weight.element_size()
    if weight_bytes >= l2_bytes:
        return [weight] * 4
    count = min(most, max(4, -(-2 * l2_bytes // weight_bytes)))
    try:
        stack = torch.empty((count, *weight.shape), dtype=weight.dtype, device=weight.device)
    except torch.cuda.OutOfMemoryError:
        return [weight] * 4   # partly cached: both sides gain alike, the choice still stands
    stack.copy_(weight.expand_as(stack))
    return list(stack)
