"""Split-KV decode attention kernel against paged_attention_reference."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.attention import paged_attention_reference
from tests.engine.kernels.paged_batch import make_paged_batch, relative_error

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_REL_TOL = 1e-2
HEAD_SHAPES = [(8, 8), (32, 8), (32, 4)]  # GQA ratios 1, 4, 8


def run_decode(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
               num_splits: int | None, tiles: tuple[int, int, int] | None = None) -> float:
    from tandem.engine.kernels.decode_attention import decode_attention

    batch = make_paged_batch(seq_lens, [1] * len(seq_lens), num_heads, num_kv_heads, head_dim)
    scale = head_dim ** -0.5
    out = torch.full_like(batch.query, float("nan"))
    decode_attention(batch.query, batch.kv_layer, batch.meta.block_tables, batch.meta.seq_lens,
                     scale, out, batch.meta.max_seq_len, num_splits=num_splits, tiles=tiles)
    ref = paged_attention_reference(batch.query, batch.kv_layer, batch.meta, scale)
    assert torch.isfinite(out).all(), "unwritten (NaN) output rows"
    return relative_error(out, ref)


@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_SHAPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_decode_matches_reference_on_mixed_lengths(num_heads, num_kv_heads, head_dim, num_splits):
    # Lengths on both sides of block and tile edges, and one sequence of a single token.
    seq_lens = [1, 15, 16, 17, 63, 64, 65, 300, 1000]
    err = run_decode(seq_lens, num_heads, num_kv_heads, head_dim, num_splits)
    assert err < BF16_REL_TOL


@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 8), (32, 4)])
@pytest.mark.parametrize("num_splits", [None, 32])
def test_decode_long_context_splits(num_heads, num_kv_heads, num_splits):
    err = run_decode([8192 + 5, 3001], num_heads, num_kv_heads, 128, num_splits)
    assert err < BF16_REL_TOL


@pytest.mark.parametrize("num_splits,tiles", [(1, (128, 4, 3)), (1, (64, 4, 3)), (3, (64, 4, 2))])
def test_decode_every_tile_choice_matches_reference(num_splits, tiles):
    err = run_decode([1, 100, 127, 128, 129, 3000], 32, 8, 128, num_splits, tiles)
    assert err < BF16_REL_TOL


def test_tiles_follow_the_programs_an_sm_holds():
    from tandem.engine.kernels.decode_attention import _num_sms, choose_tiles

    device = torch.device("cuda")
    sms = _num_sms(torch.cuda.current_device())
    assert choose_tiles(2 * sms, 1, device) == (128, 4, 3)
    assert choose_tiles(2 * sms + 1, 1, device) == (64, 4, 3)
    assert choose_tiles(8, 4, device) == (64, 4, 2)
    assert choose_tiles(sms + 1, 4, device) == (64, 4, 3)


def test_long_contexts_get_spare_splits_within_the_grid_budget():
    from tandem.engine.kernels.decode_attention import _num_sms, choose_num_splits

    device = torch.device("cuda")
    sms = _num_sms(torch.cuda.current_device())
    assert choose_num_splits(32, 8, 32768, device) == 16
    assert choose_num_splits(64, 8, 32768, device) == 8
    assert choose_num_splits(4 * sms // 8 + 1, 8, 32768, device) == 2   # every SM has 4 programs
    assert choose_num_splits(32, 8, 128, device) == 2   # no split under one 64-token tile
    assert choose_num_splits(1, 8, 32768, device) == min(64, -(-4 * sms // 8))


@pytest.mark.parametrize("seq_lens", [[4000] * 40, [32768] + [1024] * 31, [16384, 20] * 8])
@pytest.mark.parametrize("num_splits", [3, 16])
def test_decode_splits_follow_each_sequence_length(seq_lens, num_splits):
    # A batch's tokens over its programs set a split's least size, so short sequences leave most
    # of their splits empty (written as no weight) while a long one takes them all.
    err = run_decode(seq_lens, 32, 8, 128, num_splits)
    assert err < BF16_REL_TOL


def test_decode_more_splits_than_tiles_leaves_no_gap():
    # 40 splits over 20 tokens: most splits are empty and must weigh nothing in the merge.
    err = run_decode([20, 3], 32, 8, 128, 40)
    assert err < BF16_REL_TOL


def test_decode_replays_in_a_cuda_graph_with_new_lengths():
    from tandem.engine.kernels.decode_attention import decode_attention

    seq_lens = [700, 33, 2050]
    batch = make_paged_batch([3000] * 3, [1] * 3, 32, 8, 128)
    meta, scale = batch.meta, 128 ** -0.5
    query = batch.query.clone()
    out = torch.full_like(query, float("nan"))

    def step() -> None:
        decode_attention(query, batch.kv_layer, meta.block_tables, meta.seq_lens, scale, out,
                         max_seq_len=3000, num_splits=16)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    meta.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    meta.seq_lens_cpu, meta.max_seq_len = seq_lens, max(seq_lens)
    query.copy_(torch.randn_like(query))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = paged_attention_reference(query, batch.kv_layer, meta, scale)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < BF16_REL_TOL


def test_decode_padded_sequence_gives_zeros_not_nan():
    from tandem.engine.kernels.decode_attention import decode_attention

    batch = make_paged_batch([100, 40], [1, 1], 32, 8, 128)
    seq_lens = torch.tensor([100, 0], dtype=torch.int32, device="cuda")  # seq 1 is graph padding
    for num_splits in (1, 4):
        out = torch.full_like(batch.query, float("nan"))
        decode_attention(batch.query, batch.kv_layer, batch.meta.block_tables, seq_lens, 0.1,
                         out, 100, num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out[0]).all()


def test_tiles_past_the_shared_memory_fall_back_and_are_not_chosen_again(monkeypatch):
    # A GPU with less shared memory than an H100 cannot run the deep one-split tiles: the launch
    # takes the split tiles instead, and the choice leaves the deep ones out from then on.
    import triton

    from tandem.engine.kernels import decode_attention

    real = decode_attention._decode_split_kernel
    launched = []

    class SmallGpu:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append(kwargs["BLOCK_N"])
                if kwargs["num_stages"] == 3:
                    raise triton.runtime.errors.OutOfResources(200 * 1024, 163 * 1024,
                                                               "shared memory")
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(decode_attention._split_launch, "kernel", SmallGpu())
    monkeypatch.setattr(decode_attention, "_too_big", set())
    assert run_decode([1000, 300, 17], 32, 8, 128, 1) < BF16_REL_TOL
    assert launched == [128, 64] and (128, 4, 3) in decode_attention._too_big
    assert decode_attention.choose_tiles(8, 1, torch.device("cuda")) == (64, 4, 2)
    with pytest.raises(triton.runtime.errors.OutOfResources):  # asked for: not replaced
        run_decode([100], 32, 8, 128, 1, tiles=(64, 4, 3))


@pytest.mark.parametrize("seq_lens,num_splits", [([1000] * 95 + [30000], 2),
                                                 ([30000, 17] + [500] * 30, 2),
                                                 ([0, 5000, 0, 64], 3)])
def test_a_long_context_takes_the_slots_short_ones_leave(seq_lens, num_splits):
    # Two slots a sequence, yet the long context is read by many programs, not two; padded rows
    # (length 0) come out as zeros.
    from tandem.engine.kernels.decode_attention import step_pieces

    lengths = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    pieces = step_pieces(lengths, 8, num_splits)
    quantum = int(pieces.quantum)
    slack = quantum // (8 * 64) * 64   # num_pieces: pieces of 8 tiles or more take a tail
    counts = [max(1, -(-(n - slack) // quantum)) for n in seq_lens]
    assert quantum % 64 == 0 and sum(counts) <= len(seq_lens) * num_splits
    assert max(counts) > num_splits
    owners = pieces.slot_seq.tolist()
    assert owners == [i for i, c in enumerate(counts) for _ in range(c)] + \
        [-1] * (len(owners) - sum(counts))
    assert pieces.first_slot.tolist() == [sum(counts[:i]) for i in range(len(seq_lens))]

    batch = make_paged_batch([max(n, 1) for n in seq_lens], [1] * len(seq_lens), 32, 8, 128)
    batch.meta.seq_lens.copy_(lengths)
    batch.meta.seq_lens_cpu = list(seq_lens)
    scale = 128 ** -0.5
    from tandem.engine.kernels.decode_attention import decode_attention
    out = torch.full_like(batch.query, float("nan"))
    decode_attention(batch.query, batch.kv_layer, batch.meta.block_tables, batch.meta.seq_lens,
                     scale, out, max(seq_lens), num_splits=num_splits, pieces=pieces)
    live = [i for i, n in enumerate(seq_lens) if n]
    ref = paged_attention_reference(batch.query[live], batch.kv_layer, _rows(batch.meta, live),
                                    scale)
    assert torch.isfinite(out).all()
    assert relative_error(out[live], ref) < BF16_REL_TOL
    assert not out[[i for i, n in enumerate(seq_lens) if not n]].any()


def _rows(meta, rows):
    from tandem.engine.attention import AttentionMetadata
    lens = [meta.seq_lens_cpu[i] for i in rows]
    return AttentionMetadata(
        query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32, device="cuda"),
        seq_lens=meta.seq_lens[rows], block_tables=meta.block_tables[rows],
        slot_mapping=meta.slot_mapping[rows], max_query_len=1, max_seq_len=max(lens),
        query_start_loc_cpu=list(range(len(rows) + 1)), seq_lens_cpu=lens)
