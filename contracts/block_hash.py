"""The one block-hash function shared by engine, router and tests (DESIGN.md, "Block hashes").

A block's hash is xxh3-64, with a fixed seed, over the parent block's hash (8 bytes, little endian;
0 for the first block) followed by the block's token ids as little-endian u32. Chaining the parent
makes a hash identify the whole prefix up to and including its block, so equal hashes mean equal
prefixes. A partial last block is never hashed.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import numpy as np
import xxhash

BLOCK_HASH_SEED = 0x7A6D_0001
ROOT_PARENT_HASH = 0


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Hash of one full block chained to its parent's hash (None for the first block)."""
    parent = ROOT_PARENT_HASH if parent_hash is None else parent_hash
    payload = parent.to_bytes(8, "little") + _u32_le_bytes(token_ids)
    return xxhash.xxh3_64_intdigest(payload, seed=BLOCK_HASH_SEED)


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of every full block of `token_ids`, in order."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    # Same bytes as hash_block, block by block, but the ids are converted once for the whole
    # prompt: the simulator hashes millions of prompt blocks, and the per-block conversion was
    # half the cost.
    payload = _u32_le_bytes(token_ids)
    block_bytes = 4 * block_size
    hashes: list[int] = []
    parent = ROOT_PARENT_HASH
    for start in range(0, (len(token_ids) // block_size) * block_bytes, block_bytes):
        parent = xxhash.xxh3_64_intdigest(
            parent.to_bytes(8, "little") + payload[start:start + block_bytes], seed=BLOCK_HASH_SEED)
        hashes.append(parent)
    return hashes


_NATIVE_U32 = next((code for code in "IL" if array(code).itemsize == 4), None)


def _u32_le_bytes(token_ids: Sequence[int]) -> bytes:
    """The ids as little-endian u32 bytes; array.array converts Python ints 3x faster than numpy
    (an OverflowError for an id outside u32, as numpy raises)."""
    if _NATIVE_U32 is None:
        return np.asarray(token_ids, dtype="<u4").tobytes()
    ids = array(_NATIVE_U32, token_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tobytes()
