"""Attention kernel arguments that change from one eager step to the next are not specialized on,
so serving never stops a batch to compile a new variant (benchmarks/kernel_compile_bench.py)."""

from __future__ import annotations

from tandem.engine.kernels import decode_attention, prefill_attention


def _unspecialized(kernel) -> set[str]:
    return {param.name for param in kernel.params if param.do_not_specialize}


def test_step_varying_arguments_compile_once():
    assert _unspecialized(decode_attention._decode_split_kernel) == {"stride_bt_seq", "num_splits"}
    assert _unspecialized(decode_attention._decode_merge_kernel) == {"num_splits"}
    assert _unspecialized(prefill_attention._prefill_kernel) == {"stride_bt_seq"}
    # The merge's width is one constexpr for every split count the chooser can give.
    assert decode_attention._MERGE_WIDTH >= decode_attention._MAX_SPLITS
