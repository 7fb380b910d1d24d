"""A KV tensor's blocks as NIXL descriptors, and a pull's block ids: exact values, no NIXL."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.kv_transfer.descriptors import block_descriptors, check_block_pairs, count_runs


def test_block_descriptors_one_row_per_block() -> None:
    rows = block_descriptors(base_addr=1000, block_nbytes=64, num_blocks=3, dev_id=1)
    assert rows.dtype == np.int64
    assert rows.tolist() == [[1000, 64, 1], [1064, 64, 1], [1128, 64, 1]]


def test_block_descriptors_of_a_large_gpu_cache() -> None:
    block_nbytes = 2 * 2**20  # llama-3.1-8b, 16-token blocks
    rows = block_descriptors(2**47, block_nbytes, 60_000, 7)
    assert rows[-1].tolist() == [2**47 + 59_999 * block_nbytes, block_nbytes, 7]
    with pytest.raises(ValueError, match="needs blocks"):
        block_descriptors(0, 64, 0, 0)


@pytest.mark.parametrize(
    ("src", "dst", "num_runs"),
    [
        ([3, 4, 5, 9], [0, 1, 2, 7], 2),
        ([0, 1, 2, 3], [10, 11, 12, 13], 1),
        ([7], [0], 1),
        # consecutive on one side only: nothing merges
        ([1, 2, 3], [5, 4, 3], 3),
        ([0, 2, 4], [0, 1, 2], 3),
        # the caller's order is kept: a jump back starts a new run
        ([5, 6, 2, 3], [0, 1, 2, 3], 2),
        ([2, 3, 0, 1], [2, 3, 0, 1], 2),
        # one source block may feed two destination blocks
        ([4, 4], [0, 1], 2),
        (list(range(100, 1124)), list(range(1024)), 1),
    ],
)
def test_count_runs(src: list[int], dst: list[int], num_runs: int) -> None:
    check_block_pairs(src, dst, 2048, 2048)
    assert count_runs(src, dst) == num_runs


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        ([], [], "empty"),
        ([0, 1], [0], "2 source ids and 1 destination ids"),
        ([-1], [0], r"remote block id -1 is out of range: .* 12 blocks \(valid ids 0..11\)"),
        ([12], [0], "remote block id 12 is out of range"),
        ([0], [-3], "destination block id -3 is out of range"),
        ([0], [10], r"destination block id 10 is out of range: .* 10 blocks"),
        ([0.0], [0], "remote block ids must be ints"),
        ([True], [0], "remote block ids must be ints"),
        (["3"], [0], "remote block ids must be ints"),
        ([0], [[1]], "destination block ids must be ints"),
        ([np.int64(1)], [0], "remote block ids must be ints"),
        ([0, 1], [5, 5], "distinct"),
    ],
)
def test_check_block_pairs_rejects(src: list, dst: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_block_pairs(src, dst, num_src_blocks=12, num_dst_blocks=10, src_side="remote")
