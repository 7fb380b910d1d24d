"""Launching an eager Triton kernel again without Triton's argument binding.

`kernel[grid](*args, **kwargs)` binds and specializes every argument before it looks its compiled
variant up: for the decode attention's 31 arguments about 60 of the 100 us a launch costs the host
(benchmarks/RESULTS.md, "A mixed step's host time on a small model"). An eager step launches the
same attention once per layer with the same arguments but the layer's KV view and a few scratch
buffers, so that work is repeated 28-80 times a step for one answer.

A `Launcher` wraps one kernel. Its first launch, and any launch whose arguments would specialize
differently from the last full one, goes through Triton as usual and keeps the compiled variant it
returns. A launch whose arguments specialize the same way (each tensor's dtype and 16-byte
alignment, each integer's width, whether it is 1 and whether 16 divides it, the other arguments'
types, and every keyword: constexprs and launch options by value) calls that variant's launcher
directly, on the current stream. That is the variant Triton's own lookup would return: its cache
key is made of exactly these.

Off (every launch through Triton) with TANDEM_FAST_LAUNCH=0, under a launch hook (a profiler's),
inside a CUDA graph capture, and where Triton returns no compiled variant (its CPU interpreter).
"""

from __future__ import annotations

import inspect
import os

import torch
from triton import knobs

_I32 = 2**31
_I64 = 2**63
_Tensor = torch.Tensor


def _shape_of(values) -> tuple:
    """How Triton would specialize each argument, as a hashable key."""
    key = []
    for value in values:
        kind = type(value)
        if kind is int:
            key.append((value == 1, value % 16 == 0, -_I32 <= value < _I32, value < _I64))
        elif isinstance(value, _Tensor):
            key.append((value.dtype, value.data_ptr() % 16 == 0))
        else:
            key.append(kind)
    return tuple(key)


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler's): Triton keeps each as a chain of calls, empty
    unless one is added."""
    return any(hook is not None and getattr(hook, "calls", True)
               for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


def current_stream(device: torch.device) -> int:
    """The raw handle of the device's current stream, as Triton's own launch takes it."""
    return torch._C._cuda_getCurrentRawStream(device.index)


def enabled() -> bool:
    return os.environ.get("TANDEM_FAST_LAUNCH", "1") != "0"


class Launcher:
    """`launcher(grid, *args, **kwargs)` launches `kernel[grid](*args, **kwargs)`: directly when the
    arguments specialize as the last full launch's did (the module docstring)."""

    __slots__ = ("kernel", "kept", "names", "defaults")

    def __init__(self, kernel):
        self.kernel = kernel
        # (key, compiled variant) of the last full launch, one attribute so that a launch from
        # another thread never pairs one launch's key with another's variant
        self.kept: tuple | None = None
        params = inspect.signature(kernel.fn).parameters
        self.names = tuple(params)
        self.defaults = {name: p.default for name, p in params.items()
                         if p.default is not inspect.Parameter.empty}

    def __call__(self, grid: tuple[int, ...], *args, **kwargs):
        device = args[0].device   # the kernels' first argument is a tensor
        if (device.type != "cuda" or not enabled()
                or torch.cuda.is_current_stream_capturing()):
            return self.kernel[grid](*args, **kwargs)
        key = (device.index, _shape_of(args), tuple(kwargs.items()))
        kept = self.kept
        if kept is not None and kept[0] == key and not _hooked():
            return self._run(kept[1], grid, device, args, kwargs)
        compiled = self.kernel[grid](*args, **kwargs)
        fast = compiled is not None and hasattr(compiled, "packed_metadata")
        self.kept = (key, compiled) if fast else None
        return compiled

    def _run(self, compiled, grid: tuple[int, ...], device: torch.device, args: tuple,
             kwargs: dict):
        """The kept variant launched with these arguments: every parameter in signature order
        (constexprs included, as Triton passes them), on the current stream."""
        values = list(args)
        for name in self.names[len(args):]:
            values.append(kwargs[name] if name in kwargs else self.defaults[name])
        stream = current_stream(device)
        grid_y = grid[1] if len(grid) > 1 else 1
        grid_z = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
                     None, None, None, *values)
        return compiled
