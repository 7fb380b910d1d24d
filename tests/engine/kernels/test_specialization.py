"""Attention kernel arguments that change from one eager step to the next are not specialized on,
so serving never stops a batch to compile a new variant (benchmarks/kernel_compile_bench.py)."""

from __future__ import annotations

from tandem.engine.kernels import decode_attention, prefill_attention


def _unspecialized(kernel) -> set[str]:
    return {param.name for param in kernel.params if param.do_not_specialize}


def test_step_varying_arguments_compile_once():
    from tandem.engine.kernels import decode_pieces
    assert _unspecialized(decode_attention._decode_split_kernel) == {"stride_bt_seq", "num_splits"}
    assert _unspecialized(decode_pieces._piece_table_kernel) == {
        "num_seqs", "num_slots", "target_programs", "num_kv_heads", "align"}
    # The merge takes its piece counts from the table, a tile of pieces at a time; the tile
    # follows the split count, and compile_variants runs one split count for each tile width.
    assert _unspecialized(decode_pieces._merge_pieces_kernel) == {"num_splits"}
    assert {decode_pieces.merge_tile(n) for n in (2, 32, 64)} == set(decode_pieces.MERGE_TILES)
    assert {decode_pieces.merge_tile(n) for n in range(1, 200)} == set(decode_pieces.MERGE_TILES)
    assert _unspecialized(prefill_attention._prefill_kernel) == {"stride_bt_seq"}


def test_skinny_matmul_compiles_one_variant_for_every_row_count():
    from tandem.engine.kernels import skinny_gemm
    assert _unspecialized(skinny_gemm._skinny_gemm_kernel) == {"num_rows"}


def test_a_serving_engine_borrows_the_nearest_measured_choice(monkeypatch):
    # Once serving, an unseen row count is never timed: it takes the choice of the nearest
    # measured row count with the same row tile, or cuBLAS (None) when there is none.
    import torch

    from tandem.engine.kernels import skinny_gemm

    def no_timing(*args):
        raise AssertionError("timed while serving")

    weight = ("N", "K", torch.bfloat16, False, "out")
    monkeypatch.setattr(skinny_gemm, "_chosen", {(1, *weight): (16, 256, 4, 4),
                                                 (16, *weight): (32, 256, 4, 4),
                                                 (32, *weight): None})
    monkeypatch.setattr(skinny_gemm, "choose", no_timing)
    assert skinny_gemm.nearest_choice((13, *weight)) == (32, 256, 4, 4)   # 16 is nearest
    assert skinny_gemm.nearest_choice((3, *weight)) == (16, 256, 4, 4)
    assert skinny_gemm.nearest_choice((20, *weight)) is None              # 32's choice: cuBLAS
    assert skinny_gemm.nearest_choice((40, *weight)) is None              # no 64-row tile measured
    assert skinny_gemm.nearest_choice((3, "M", "K", torch.bfloat16, False, "out")) is None
    monkeypatch.setattr(skinny_gemm._timing, "serving", True)
    with skinny_gemm.allow_timing():
        assert skinny_gemm._timing.depth == 1
    assert skinny_gemm._timing.depth == 0


def test_every_prefill_tile_choice_is_compiled_at_start_up():
    # compile_variants runs one query length per tile choice; every length a step may have maps
    # to one of those choices, so no prefill variant is left to compile while serving.
    for head_dim in (64, 128, 256):
        every = {prefill_attention.default_config(head_dim, q) for q in range(1, 9000)}
        assert every == {prefill_attention.default_config(head_dim, q)
                         for q in prefill_attention.VARIANT_QUERY_LENS}
