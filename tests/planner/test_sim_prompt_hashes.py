"""The simulator's memoised prompt hashes are the contract's hashes, block for block."""

from __future__ import annotations

import random

import pytest

from tandem.contracts.block_hash import hash_prompt_blocks
from tandem.planner.sim_prompt_hashes import PromptHasher


@pytest.mark.parametrize("block_size", [1, 7, 16, 512, 1000])
def test_memoised_hashes_equal_the_contract(block_size):
    hasher = PromptHasher(block_size)
    rng = random.Random(block_size)
    shared = [rng.randrange(2000) for _ in range(3000)]
    for length in (0, 1, 15, 16, 511, 512, 513, 1024, 2000, 3000):
        for prompt in (shared[:length], shared[:length][::-1], shared[:length] + [5] * 40):
            assert hasher.hashes(prompt) == hash_prompt_blocks(prompt, block_size)


def test_a_repeated_prefix_is_taken_from_the_memo():
    hasher = PromptHasher(16)
    turn_1 = list(range(16, 16 + 1100))
    first = hasher.hashes(turn_1)
    assert len(hasher._memo) == 2  # two whole 512-token chunks; the rest is hashed directly
    second = hasher.hashes(turn_1 + list(range(100, 600)))
    assert second[:len(first)] == first and len(hasher._memo) == 3
    assert second == hash_prompt_blocks(turn_1 + list(range(100, 600)), 16)
    with pytest.raises(OverflowError):
        hasher.hashes([-1] * 16)
