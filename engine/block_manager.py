"""Block manager: hands out KV-cache blocks, counts references and keeps a prefix cache.

Ideas from nano-vllm's BlockManager and vLLM v1's KV cache manager:

- Every block has a reference count. A block whose count drops to zero goes to the back of the free
  queue; allocation takes from the front, so the queue is also the LRU eviction order.
- A full block that has been computed is registered under its chained hash (tandem.contracts.block_hash).
  When it is freed it keeps its hash and contents, so a later prompt with the same prefix can take it
  back out of the free queue instead of recomputing it. Only when allocation reuses it for other
  tokens is it evicted, and its hash forgotten.
- A sequence frees its blocks last-first, so the tail of a prefix is evicted before its head: the
  head is the part other prompts are most likely to share.
- The blocks of one allocation are handed out in ascending id order, so a prompt's blocks tend to
  form consecutive runs, which kv_transfer moves as single descriptors.
- Every change to the set of cached hashes is published as a KV event (stored, removed, cleared)
  with an increasing event id, to every subscriber.

The manager does no I/O and knows nothing of sequences: callers hold block tables (lists of ids).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from itertools import chain, islice, repeat

from tandem.contracts.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

logger = logging.getLogger(__name__)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.parent_of: dict[int, int | None] = {}  # cached hash -> its parent's hash
        # Blocks with no references, oldest first; an OrderedDict gives O(1) removal from the middle.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.next_event_id = 0
        self.subscribers: list[Callable[[KVEvent], None]] = []

    # ---- queries -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now: never used, or cached with no references."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def match_prefix(self, block_hashes: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of `block_hashes` (no references taken)."""
        if not self.enable_prefix_caching:
            return []
        matched = []
        for block_hash in block_hashes:
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def cached_hashes(self) -> tuple[list[int], list[int | None]]:
        """Every hash in the prefix cache, in the order cached, with its parent: a snapshot."""
        return list(self.parent_of), list(self.parent_of.values())

    # ---- allocation --------------------------------------------------------------------------

    def can_allocate(self, num_blocks: int, reusing: list[int] = ()) -> bool:
        """Whether num_blocks fresh blocks can be had after acquiring the cached blocks `reusing`:
        those among them with no reference sit in the free queue and leave it when acquired."""
        num_leaving = sum(self.ref_counts[b] == 0 for b in reusing)
        return num_blocks + num_leaving <= len(self.free_queue)

    def acquire(self, block_ids: list[int]) -> None:
        """Take a reference on blocks found by match_prefix (they may be sitting in the free queue)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Fresh blocks with one reference each, evicting cached free blocks in LRU order."""
        free_queue = self.free_queue
        if num_blocks > len(free_queue):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(free_queue)} free")
        if num_blocks == 1:  # a decode step's usual need: skip the run machinery
            block_id, _ = free_queue.popitem(last=False)
            if self.block_hashes[block_id] is not None:
                self._evict([block_id])
            self.ref_counts[block_id] = 1
            return [block_id]
        # The front of the queue in one C-level pass per structure: a 12k-token prompt takes
        # hundreds of blocks, and a Python loop per block was a quarter of the simulator's time.
        taken = list(islice(free_queue, num_blocks))
        deque(map(free_queue.__delitem__, taken), maxlen=0)
        old_hashes = list(map(self.block_hashes.__getitem__, taken))
        if old_hashes.count(None) != num_blocks:
            self._evict([b for b, h in zip(taken, old_hashes) if h is not None])
        deque(map(self.ref_counts.__setitem__, taken, repeat(1)), maxlen=0)
        # Which blocks are taken follows the LRU order; handing them out in ascending id order
        # makes consecutive runs, which a KV transfer moves as one descriptor instead of many.
        taken.sort()
        return taken

    def _evict(self, block_ids: list[int]) -> None:
        """Forget the cached hashes of blocks being reused, in LRU order, as one event."""
        if len(block_ids) == 1:  # a decode step's new block: C-level passes cost more here
            block_id = block_ids[0]
            old_hash = self.block_hashes[block_id]
            del self.hash_to_block[old_hash], self.parent_of[old_hash]
            self.block_hashes[block_id] = None
            self._publish(lambda event_id: BlockRemoved(event_id, (old_hash,)))
            return
        evicted = tuple(map(self.block_hashes.__getitem__, block_ids))
        deque(map(self.hash_to_block.__delitem__, evicted), maxlen=0)
        deque(map(self.parent_of.__delitem__, evicted), maxlen=0)
        deque(map(self.block_hashes.__setitem__, block_ids, repeat(None)), maxlen=0)
        self._publish(lambda event_id: BlockRemoved(event_id, evicted))

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference on each block, last block first (see the module docstring)."""
        last_first = block_ids[::-1]
        ref_counts = self.ref_counts
        if (list(map(ref_counts.__getitem__, last_first)).count(1) == len(last_first)
                and len(set(last_first)) == len(last_first)):
            # Every block's last reference (a finished request's own blocks): one C-level pass.
            deque(map(ref_counts.__setitem__, last_first, repeat(0)), maxlen=0)
            free_queue = self.free_queue
            for block_id in last_first:  # OrderedDict.update is far slower than item by item
                free_queue[block_id] = None
            return
        for block_id in last_first:
            assert ref_counts[block_id] > 0, f"block {block_id} freed twice"
            ref_counts[block_id] -= 1
            if ref_counts[block_id] == 0:
                self.free_queue[block_id] = None

    # ---- prefix cache ------------------------------------------------------------------------

    def cache_blocks(self, block_ids: list[int], block_hashes: list[int],
                     parent_hash: int | None) -> list[int]:
        """Register computed full blocks under their chained hashes; returns the ids now cached.

        `block_ids[i]` holds the block whose hash is `block_hashes[i]`, and `parent_hash` is the hash
        of the block before the first one. A hash already cached under another block (two requests
        computed the same prefix at once) keeps its first block; the duplicate stays uncached and is
        simply freed later.
        """
        if not self.enable_prefix_caching or not block_ids:
            return []
        assert len(block_ids) == len(block_hashes)
        if len(block_ids) > 1 and self._are_all_new(block_ids, block_hashes):
            return self._cache_run(block_ids, block_hashes, parent_hash)
        cached = []
        run: list[int] = []  # consecutive newly stored hashes, published as one chained event
        run_parent = parent_hash
        parent = parent_hash
        for block_id, block_hash in zip(block_ids, block_hashes):
            block_parent, parent = parent, block_hash
            if block_hash in self.hash_to_block or self.block_hashes[block_id] is not None:
                self._publish_stored(run_parent, run)
                run, run_parent = [], block_hash
                continue
            self.hash_to_block[block_hash] = block_id
            self.parent_of[block_hash] = block_parent
            self.block_hashes[block_id] = block_hash
            cached.append(block_id)
            run.append(block_hash)
        self._publish_stored(run_parent, run)
        return cached

    def _are_all_new(self, block_ids: list[int], block_hashes: list[int]) -> bool:
        """No hash is cached yet and no block holds one: the common case after a fresh prefill."""
        return (self.hash_to_block.keys().isdisjoint(block_hashes)
                and list(map(self.block_hashes.__getitem__, block_ids)).count(None)
                == len(block_ids)
                and len(set(block_hashes)) == len(block_hashes) == len(set(block_ids)))

    def _cache_run(self, block_ids: list[int], block_hashes: list[int],
                   parent_hash: int | None) -> list[int]:
        """cache_blocks for a run of new hashes on uncached blocks, without a loop per block."""
        self.hash_to_block.update(zip(block_hashes, block_ids))
        self.parent_of.update(zip(block_hashes, chain((parent_hash,), block_hashes)))
        deque(map(self.block_hashes.__setitem__, block_ids, block_hashes), maxlen=0)
        self._publish_stored(parent_hash, block_hashes)
        return list(block_ids)

    def _publish_stored(self, parent_hash: int | None, block_hashes: list[int]) -> None:
        if block_hashes:
            stored = tuple(block_hashes)
            self._publish(lambda event_id: BlockStored(event_id, parent_hash, stored))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible while no block is referenced."""
        if self.num_used_blocks:
            return False
        self.hash_to_block.clear()
        self.parent_of.clear()
        self.block_hashes = [None] * self.num_blocks
        self._publish(AllBlocksCleared)
        return True

    # ---- events ------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[KVEvent], None]) -> None:
        self.subscribers.append(callback)

    def _publish(self, make_event: Callable[[int], KVEvent]) -> None:
        event = make_event(self.next_event_id)
        self.next_event_id += 1
        for callback in self.subscribers:
            callback(event)
