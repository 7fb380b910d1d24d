"""A kernel launched again with arguments that specialize as before skips Triton's binding and
runs the variant its last full launch compiled; anything else goes through Triton."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.kernels import fast_launch
from tandem.engine.kernels.fast_launch import Launcher


def _kernel_fn(x_ptr, out_ptr, n, scale, BLOCK, FLAG=False):
    pass


class _Compiled:
    """Stands for a compiled variant: records what its launcher is given."""

    function, packed_metadata = "cufunction", ("packed",)

    def __init__(self, runs: list):
        self.runs = runs

    def run(self, *args):
        self.runs.append(args)


class _Kernel:
    """Stands for a JIT function: each full launch is recorded and returns the variant."""

    fn = staticmethod(_kernel_fn)

    def __init__(self):
        self.full, self.runs = [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.full.append((grid, args, kwargs))
            return _Compiled(self.runs)
        return launch


class _CudaLike:
    """A tensor on "cuda:0" at a chosen address."""

    def __init__(self, address: int, dtype=torch.bfloat16):
        self.device, self.dtype, self.address = torch.device("cuda", 0), dtype, address

    def data_ptr(self) -> int:
        return self.address


@pytest.fixture
def on_fake_gpu(monkeypatch):
    monkeypatch.setattr(fast_launch, "_Tensor", _CudaLike)
    monkeypatch.setattr(fast_launch.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(fast_launch, "current_stream", lambda device: 77)
    monkeypatch.delenv("TANDEM_FAST_LAUNCH", raising=False)


def test_a_launch_that_specializes_as_before_runs_the_kept_variant(on_fake_gpu):
    kernel = _Kernel()
    launch = Launcher(kernel)
    x, out = _CudaLike(1024), _CudaLike(4096)
    launch((4, 2), x, out, 48, 0.5, BLOCK=64)
    assert len(kernel.full) == 1 and not kernel.runs
    other_x = _CudaLike(8192)   # another layer's view: same dtype, also 16-byte aligned
    launch((4, 2), other_x, out, 32, 0.25, BLOCK=64)
    assert len(kernel.full) == 1
    # grid padded to three axes, the stream, the variant, no launch hooks, then every
    # parameter in signature order: the constexprs and the default included
    assert kernel.runs == [(4, 2, 1, 77, "cufunction", ("packed",), None, None, None,
                            other_x, out, 32, 0.25, 64, False)]


@pytest.mark.parametrize("change", [
    {"x": _CudaLike(1032)},                       # no longer 16-byte aligned
    {"x": _CudaLike(1024, torch.float32)},        # another dtype
    {"n": 1},                                     # Triton makes 1 a constant
    {"n": 40},                                    # 16 no longer divides it
    {"n": 2**31},                                 # a 64-bit integer
    {"BLOCK": 128},                               # another constexpr
    {"num_warps": 8},                             # another launch option
    {"grid": (4, 2)},                             # the same: the only case that runs directly
])
def test_any_other_specialization_goes_through_triton(on_fake_gpu, change):
    kernel = _Kernel()
    launch = Launcher(kernel)
    base = {"x": _CudaLike(1024), "n": 48, "BLOCK": 64, "num_warps": 4, "grid": (4, 2)}
    launch(base["grid"], base["x"], _CudaLike(4096), base["n"], 0.5, BLOCK=base["BLOCK"],
           num_warps=base["num_warps"])
    args = {**base, **change}
    launch(args["grid"], args["x"], _CudaLike(4096), args["n"], 0.5, BLOCK=args["BLOCK"],
           num_warps=args["num_warps"])
    assert len(kernel.full) == (1 if change == {"grid": (4, 2)} else 2)


def test_off_by_switch_under_a_capture_with_a_launch_hook_and_on_the_cpu(on_fake_gpu, monkeypatch):
    kernel = _Kernel()
    launch = Launcher(kernel)
    x, out = _CudaLike(1024), _CudaLike(4096)
    monkeypatch.setenv("TANDEM_FAST_LAUNCH", "0")
    for _ in range(2):
        launch((1,), x, out, 16, 1.0, BLOCK=16)
    monkeypatch.delenv("TANDEM_FAST_LAUNCH")
    monkeypatch.setattr(fast_launch.torch.cuda, "is_current_stream_capturing", lambda: True)
    for _ in range(2):
        launch((1,), x, out, 16, 1.0, BLOCK=16)
    assert len(kernel.full) == 4 and not kernel.runs
    monkeypatch.setattr(fast_launch.torch.cuda, "is_current_stream_capturing", lambda: False)
    from triton import knobs
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)   # a profiler's: it must see every launch
    try:
        for _ in range(2):
            launch((1,), x, out, 16, 1.0, BLOCK=16)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.full) == 6 and not kernel.runs
    cpu = Launcher(_Kernel())
    for _ in range(2):
        cpu((1,), torch.zeros(4), torch.zeros(4), 16, 1.0, BLOCK=16)
    assert len(cpu.kernel.full) == 2 and not cpu.kernel.runs


def test_a_variant_not_returned_is_never_run_directly(on_fake_gpu):
    class Interpreted(_Kernel):   # Triton's CPU interpreter returns no compiled variant
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                self.full.append(args)
            return launch

    kernel = Interpreted()
    launch = Launcher(kernel)
    for _ in range(3):
        launch((1,), _CudaLike(1024), _CudaLike(4096), 16, 1.0, BLOCK=16)
    assert len(kernel.full) == 3


def test_each_entry_kernel_launched_eagerly_goes_through_a_launcher():
    from tandem.engine.kernels import decode_attention, decode_pieces, prefill_attention
    assert decode_attention._split_launch.kernel is decode_attention._decode_split_kernel
    assert decode_pieces._merge_launch.kernel is decode_pieces._merge_pieces_kernel
    assert decode_pieces._piece_table_launch.kernel is decode_pieces._piece_table_kernel
    assert prefill_attention._prefill_launch.kernel is prefill_attention._prefill_kernel
