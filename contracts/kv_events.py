"""KV cache events: what a worker's cache gained or lost, in order (DESIGN.md, "KV events").

Every event carries a per-worker event id that increases by one, so a subscriber that sees a gap
knows it missed something and asks for a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    event_id: int
    parent_hash: int | None
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    event_id: int
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    event_id: int


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
