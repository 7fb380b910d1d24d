"""The shared block hash: chained, deterministic, full blocks only."""

from __future__ import annotations

import numpy as np
import xxhash

from tandem.contracts.block_hash import BLOCK_HASH_SEED, hash_block, hash_prompt_blocks


def test_matches_xxh3_over_parent_and_little_endian_u32_tokens():
    tokens = [1, 2, 70000, 4]
    payload = (0).to_bytes(8, "little") + np.array(tokens, dtype="<u4").tobytes()
    assert hash_block(None, tokens) == xxhash.xxh3_64_intdigest(payload, seed=BLOCK_HASH_SEED)


def test_chained_hashes_identify_the_whole_prefix():
    a = hash_prompt_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=4)
    b = hash_prompt_blocks([9, 9, 9, 9, 5, 6, 7, 8], block_size=4)
    assert len(a) == 2  # the partial last block is not hashed
    assert a[1] != b[1]  # same tokens in block 2, different parents
    assert a[1] == hash_block(a[0], [5, 6, 7, 8])
    assert hash_prompt_blocks([1, 2, 3], block_size=4) == []


def test_prompt_hashes_equal_block_by_block_hashes_over_the_whole_u32_range():
    rng = np.random.default_rng(0)
    tokens = [0, 2**32 - 1, *rng.integers(0, 2**32, size=62).tolist()]
    hashes = hash_prompt_blocks(tokens, block_size=16)
    parent = None
    for i, block_hash in enumerate(hashes):
        parent = hash_block(parent, tokens[16 * i:16 * (i + 1)])
        assert block_hash == parent
    assert len(hashes) == 4
    for bad in ([-1] * 16, [2**32] * 16):
        try:
            hash_prompt_blocks(bad, block_size=16)
        except OverflowError:
            continue
        raise AssertionError(f"{bad[0]} is not a u32 token id and must not hash")
