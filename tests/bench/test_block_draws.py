"""The trace's block draws must be numpy's default_rng([seed, 3, id]) draws, id for id."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.bench.block_draws import BlockTokens, pcg64_states
from tandem.bench.datasets import random_token_ids


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1, 2**40 + 3])
def test_vectorised_seeding_matches_default_rng(seed):
    ids = [0, 1, 5, 2**31 + 7, 2**32 - 1, *range(100, 400, 7)]
    words = [seed & 0xFFFF_FFFF] + ([seed >> 32] if seed >> 32 else [])
    for hash_id, (state, inc) in zip(ids, pcg64_states(words, ids)):
        expected = np.random.default_rng([seed, 3, hash_id]).bit_generator.state["state"]
        assert expected == {"state": state, "inc": inc}


@pytest.mark.parametrize("seed,tokens_per_block,vocab_size", [(0, 512, 2000), (7, 16, 50),
                                                               (-1, 16, 2000), (3, 1, 2000)])
def test_block_tokens_equal_default_rng_draws(seed, tokens_per_block, vocab_size):
    blocks = BlockTokens(seed, tokens_per_block, vocab_size)
    ids = [3, 0, 2**32 + 5, 17, 3]  # an id past 32 bits and a repeat take the plain path
    if seed >= 0:
        blocks.prepare(ids)
    for hash_id in ids:
        if seed < 0:
            with pytest.raises(ValueError):
                blocks.tokens(hash_id)
            return
        expected = random_token_ids(np.random.default_rng([seed, 3, hash_id]), tokens_per_block,
                                    vocab_size)
        assert tuple(blocks.tokens(hash_id)) == tuple(expected)
    assert blocks.tokens(3) is blocks.tokens(3)


def test_an_id_whose_draws_numpy_rejects_is_drawn_as_numpy_draws_it():
    # With seed 0, 512 tokens and 2,000 ids, id 128685 draws a word Lemire's method rejects (found
    # by scanning ids): the batch must leave it to `integers`, which draws again there.
    blocks = BlockTokens(0, 512, 2000)
    ids = [5, 128685, 6]
    blocks.prepare(ids)
    for hash_id in ids:
        expected = random_token_ids(np.random.default_rng([0, 3, hash_id]), 512, 2000)
        assert tuple(blocks.tokens(hash_id)) == tuple(expected)
