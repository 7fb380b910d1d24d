"""Block ids to runs to NIXL descriptors: exact values, no NIXL needed."""

from __future__ import annotations

import pytest

from tandem.kv_transfer.descriptors import (
    check_block_ids,
    coalesce_block_runs,
    dst_descriptors,
    src_descriptors,
)


@pytest.mark.parametrize(
    ("src", "dst", "runs"),
    [
        ([3, 4, 5, 9], [0, 1, 2, 7], [(3, 0, 3), (9, 7, 1)]),
        ([0, 1, 2, 3], [10, 11, 12, 13], [(0, 10, 4)]),
        ([7], [0], [(7, 0, 1)]),
        # consecutive on one side only: nothing merges
        ([1, 2, 3], [5, 4, 3], [(1, 5, 1), (2, 4, 1), (3, 3, 1)]),
        ([0, 2, 4], [0, 1, 2], [(0, 0, 1), (2, 1, 1), (4, 2, 1)]),
        # the caller's order is kept: a jump back starts a new run
        ([5, 6, 2, 3], [0, 1, 2, 3], [(5, 0, 2), (2, 2, 2)]),
        ([2, 3, 0, 1], [2, 3, 0, 1], [(2, 2, 2), (0, 0, 2)]),
        # one source block may feed two destination blocks
        ([4, 4], [0, 1], [(4, 0, 1), (4, 1, 1)]),
    ],
)
def test_coalesce_block_runs(
    src: list[int], dst: list[int], runs: list[tuple[int, int, int]]
) -> None:
    assert coalesce_block_runs(src, dst) == runs


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        ([], [], "empty"),
        ([0, 1], [0], "2 source ids and 1 destination ids"),
        ([-1], [0], "non-negative"),
        ([0], [-3], "non-negative"),
        ([0.0], [0], "non-negative ints"),
        ([True], [0], "non-negative ints"),
        ([0, 1], [5, 5], "distinct"),
    ],
)
def test_coalesce_block_runs_rejects(src: list, dst: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coalesce_block_runs(src, dst)


def test_descriptors_for_both_sides() -> None:
    runs = [(3, 0, 3), (9, 7, 1)]
    assert src_descriptors(runs, base_addr=1000, block_nbytes=64, dev_id=1) == [
        (1000 + 3 * 64, 3 * 64, 1),
        (1000 + 9 * 64, 64, 1),
    ]
    assert dst_descriptors(runs, base_addr=5000, block_nbytes=64, dev_id=0) == [
        (5000, 3 * 64, 0),
        (5000 + 7 * 64, 64, 0),
    ]


def test_two_mib_blocks_of_a_long_run() -> None:
    block_nbytes = 2 * 2**20
    runs = coalesce_block_runs(list(range(100, 1124)), list(range(1024)))
    assert runs == [(100, 0, 1024)]
    assert src_descriptors(runs, 2**40, block_nbytes, 0) == [(2**40 + 100 * block_nbytes, 2**31, 0)]


def test_check_block_ids() -> None:
    check_block_ids([0, 9, 4], num_blocks=10, side="local")
    with pytest.raises(ValueError, match=r"local block id 10 is out of range: .* 10 blocks"):
        check_block_ids([0, 10], num_blocks=10, side="local")
    with pytest.raises(ValueError, match="out of range"):
        check_block_ids([-1], num_blocks=10, side="remote")
    with pytest.raises(ValueError, match="must be ints"):
        check_block_ids(["3"], num_blocks=10, side="remote")
