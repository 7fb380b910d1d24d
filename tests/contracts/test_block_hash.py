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
