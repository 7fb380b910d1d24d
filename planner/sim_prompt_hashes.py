"""Chained block hashes of the simulator's prompts, memoised chunk by chunk.

A conversation's next turn repeats the previous turn's prompt, and a trace's prompts are runs of
shared 512-token blocks, so the simulator hashed the same prefixes again and again: 9.3M blocks for
the whole conversation trace, one xxh3 call and two byte-string joins each. Here a prompt is cut
into chunks of `CHUNK_TOKENS` tokens from its start; a chunk's block hashes depend only on the
parent hash before it and the chunk's bytes, so they are kept under (parent hash, xxh3-128 of the
bytes) and a chunk seen before costs one 128-bit hash of its bytes instead of one call per block.
A 128-bit digest colliding is far less likely than the 64-bit block hashes themselves colliding,
which tandem already takes to mean equal prefixes. The hashes are those of
`tandem.contracts.block_hash.hash_prompt_blocks`, block for block (tests/planner checks it).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import xxhash

from tandem.contracts.block_hash import BLOCK_HASH_SEED, ROOT_PARENT_HASH, hash_prompt_blocks

CHUNK_TOKENS = 512  # a trace block (tandem/bench/trace.py): the unit prompts share


class PromptHasher:
    def __init__(self, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.chunk_blocks = max(1, CHUNK_TOKENS // block_size)
        self._memo: dict[tuple[int, int], list[int]] = {}
        self._is_u32 = array("I").itemsize == 4 and sys.byteorder == "little"

    def hashes(self, token_ids: Sequence[int]) -> list[int]:
        """Chained hashes of every full block of `token_ids`, in order."""
        if not self._is_u32:
            return hash_prompt_blocks(token_ids, self.block_size)
        payload = array("I", token_ids).tobytes()  # OverflowError outside u32, as numpy raises
        block_bytes = 4 * self.block_size
        chunk_bytes = block_bytes * self.chunk_blocks
        num_full_bytes = (len(token_ids) // self.block_size) * block_bytes
        memo, digest = self._memo, xxhash.xxh3_128_intdigest
        hashes: list[int] = []
        parent = ROOT_PARENT_HASH
        for start in range(0, num_full_bytes - chunk_bytes + 1, chunk_bytes):
            chunk = payload[start:start + chunk_bytes]
            key = (parent, digest(chunk))
            chunk_hashes = memo.get(key)
            if chunk_hashes is None:
                chunk_hashes = memo[key] = _chain(parent, chunk, block_bytes)
            hashes += chunk_hashes
            parent = chunk_hashes[-1]
        hashes += _chain(parent, payload[len(hashes) * block_bytes:num_full_bytes], block_bytes)
        return hashes


def _chain(parent: int, payload: bytes, block_bytes: int) -> list[int]:
    hashes = []
    digest = xxhash.xxh3_64_intdigest
    for start in range(0, len(payload), block_bytes):
        parent = digest(parent.to_bytes(8, "little") + payload[start:start + block_bytes],
                        BLOCK_HASH_SEED)  # positional: a keyword costs a tenth of the call
        hashes.append(parent)
    return hashes
