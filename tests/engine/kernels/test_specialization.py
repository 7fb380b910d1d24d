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


class _Recorder:
    """Stands for a Triton kernel: records each launch's compile-time keywords."""

    def __init__(self, seen: set):
        self.seen = seen

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.add(tuple(sorted(kwargs.items())))


def test_every_decode_variant_a_step_launches_is_compiled_at_start_up(monkeypatch):
    # The split, piece-table and merge kernels' launches are recorded, not run: what
    # compile_variants launches at start-up against what decode steps of every batch size,
    # longest context and split count launch later (eager: no programmatic launch).
    import torch

    from tandem.engine.kernels import decode_pieces
    from tandem.engine.kernels.decode_attention import QKVPrep, choose_num_splits

    monkeypatch.setattr(decode_attention, "_device_sms", lambda device: 132)
    kernels = {"split": (decode_attention._split_launch, "kernel"),
               "table": (decode_pieces._piece_table_launch, "kernel"),
               "merge": (decode_pieces._merge_launch, "kernel")}

    def record() -> dict[str, set]:
        seen = {key: set() for key in kernels}
        for key, (launcher, name) in kernels.items():
            monkeypatch.setattr(launcher, name, _Recorder(seen[key]))
        return seen

    heads, kv_heads, head_dim = 32, 8, 128
    kv_layer = torch.zeros(64, 2, 16, kv_heads, head_dim, dtype=torch.bfloat16)
    rope = torch.zeros(64, head_dim // 2)
    prep = QKVPrep(torch.zeros(1, dtype=torch.int64), rope, rope, None, None, 1e-6,
                   torch.full((1,), -1, dtype=torch.int64))
    compiled = record()
    decode_attention.compile_variants(kv_layer, heads, prep)
    launched = record()
    for num_seqs in (1, 2, 3, 8, 16, 17, 40, 66, 67, 200):
        for longest in (16, 700, 5000, 32768):
            for num_splits in {1, choose_num_splits(num_seqs, kv_heads, longest, "cpu")}:
                lens = torch.full((num_seqs,), min(longest, 1024), dtype=torch.int32)
                query = torch.zeros(num_seqs, heads, head_dim, dtype=torch.bfloat16)
                tables = torch.zeros(num_seqs, 1, dtype=torch.int32)
                decode_attention.decode_attention(query, kv_layer, tables, lens, 1.0,
                                                  torch.empty_like(query), longest,
                                                  num_splits=num_splits)
                if num_seqs <= 16:
                    qkv = torch.zeros(num_seqs, (heads + 2 * kv_heads) * head_dim,
                                      dtype=torch.bfloat16)
                    many = QKVPrep(prep.positions.repeat(num_seqs), rope, rope, None, None,
                                   1e-6, prep.slot_mapping.repeat(num_seqs))
                    decode_attention.decode_attention(qkv, kv_layer, tables, lens, 1.0,
                                                      torch.empty_like(query), longest,
                                                      num_splits=num_splits, prep=many)
    for name in kernels:
        assert launched[name] <= compiled[name], (name, launched[name] - compiled[name])
    assert len(launched["split"]) >= 6 and launched["merge"]
