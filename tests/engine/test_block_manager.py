"""Block manager: exact block ids, reference counts, LRU eviction order and KV events."""

from __future__ import annotations

import pytest

from tandem.engine.block_manager import BlockManager
from tandem.contracts.kv_events import AllBlocksCleared, BlockRemoved, BlockStored


def make(num_blocks: int = 4) -> tuple[BlockManager, list]:
    manager = BlockManager(num_blocks, block_size=4)
    events: list = []
    manager.subscribe(events.append)
    return manager, events


def test_allocates_lowest_ids_first_and_counts_references():
    manager, _ = make()
    assert manager.allocate(2) == [0, 1]
    assert manager.allocate(1) == [2]
    assert manager.ref_counts == [1, 1, 1, 0]
    assert manager.num_free_blocks == 1
    manager.acquire([1])
    assert manager.ref_counts[1] == 2
    manager.free([1])
    assert manager.ref_counts[1] == 1 and manager.num_free_blocks == 1
    with pytest.raises(RuntimeError):
        manager.allocate(2)


def test_freed_blocks_queue_in_reverse_so_the_tail_is_evicted_first():
    manager, _ = make()
    table = manager.allocate(4)
    manager.free(table)
    assert list(manager.free_queue) == [3, 2, 1, 0]
    assert manager.allocate(1) == [3]


def test_a_hit_on_a_free_block_takes_it_out_of_the_queue_and_keeps_the_order():
    manager, _ = make()
    table = manager.allocate(4)
    manager.cache_blocks(table, [1, 2, 3, 4], None)
    manager.free(table)  # free queue: 3, 2, 1, 0
    manager.acquire([2])
    assert manager.free_queue == [3, 1, 0] and manager.num_free_blocks == 3
    manager.free([2])
    assert manager.free_queue == [3, 1, 0, 2]
    assert manager.allocate(2) == [1, 3]  # the two oldest, not block 2 from its old place
    assert manager.allocate(2) == [0, 2]
    assert manager.num_free_blocks == 0


def test_stale_free_queue_entries_do_not_pile_up():
    manager, _ = make()
    manager.free(manager.allocate(4))  # free queue: 3, 2, 1, 0
    for _ in range(50):
        manager.acquire([1])
        manager.free([1])
    assert manager.free_queue == [3, 2, 0, 1]
    assert len(manager._free_ids) <= 2 * manager.num_blocks + 1
    assert manager.allocate(4) == [0, 1, 2, 3] and manager.num_free_blocks == 0


def test_prefix_cache_hit_reuses_a_freed_block():
    manager, events = make()
    table = manager.allocate(2)
    manager.cache_blocks(table, [111, 222], parent_hash=None)
    assert events == [BlockStored(0, None, (111, 222))]
    manager.free(table)
    assert manager.match_prefix([111, 222, 333]) == [0, 1]
    assert manager.match_prefix([333, 222]) == []  # stops at the first miss
    manager.acquire([0, 1])
    assert manager.ref_counts[:2] == [1, 1]
    assert manager.num_free_blocks == 2


def test_lru_eviction_order_and_removed_events():
    manager, events = make(num_blocks=3)
    a = manager.allocate(1)
    manager.cache_blocks(a, [10], None)
    b = manager.allocate(1)
    manager.cache_blocks(b, [20], None)
    manager.free(a)          # a is least recently used
    manager.free(b)
    assert list(manager.free_queue) == [2, 0, 1]
    assert manager.allocate(1) == [2]   # the never-used block goes first
    assert manager.allocate(1) == [0]   # then a, evicting hash 10
    assert events[-1] == BlockRemoved(2, (10,))
    assert manager.match_prefix([10]) == [] and manager.match_prefix([20]) == [1]
    assert [e.event_id for e in events] == [0, 1, 2]


def test_duplicate_hash_keeps_first_block_and_splits_the_chain():
    manager, events = make()
    first = manager.allocate(1)
    manager.cache_blocks(first, [1], None)
    second = manager.allocate(3)
    cached = manager.cache_blocks(second, [1, 2, 3], None)
    assert cached == [2, 3]
    assert manager.match_prefix([1, 2, 3]) == [0, 2, 3]
    assert events[1] == BlockStored(1, 1, (2, 3))


def test_reset_prefix_cache_only_when_idle():
    manager, events = make()
    table = manager.allocate(1)
    manager.cache_blocks(table, [5], None)
    assert manager.reset_prefix_cache() is False
    manager.free(table)
    assert manager.reset_prefix_cache() is True
    assert events[-1] == AllBlocksCleared(1)
    assert manager.match_prefix([5]) == []


def test_prefix_caching_disabled_never_matches():
    manager = BlockManager(4, 4, enable_prefix_caching=False)
    table = manager.allocate(1)
    assert manager.cache_blocks(table, [5], None) == []
    assert manager.match_prefix([5]) == []


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_one_allocation_is_handed_out_in_ascending_order():
    manager, _ = make()
    manager.free(manager.allocate(4))  # the free queue is now 3, 2, 1, 0
    assert manager.allocate(3) == [1, 2, 3]  # the three LRU blocks, as one consecutive run


def test_snapshot_lists_cached_hashes_with_their_parents_in_cache_order():
    manager, _ = make()
    first = manager.allocate(2)
    manager.cache_blocks(first, [11, 12], parent_hash=None)
    second = manager.allocate(1)
    manager.cache_blocks(second, [13], parent_hash=12)
    assert manager.cached_hashes() == ([11, 12, 13], [None, 11, 12])
    manager.free(second)
    manager.free(first)  # free queue: the unused block 3, then 2, 1, 0
    manager.allocate(2)  # takes block 3 and evicts block 2 (hash 13)
    assert manager.cached_hashes() == ([11, 12], [None, 11])


def test_can_allocate_counts_cached_free_blocks_that_will_be_reused():
    manager, _ = make()
    table = manager.allocate(2)
    manager.cache_blocks(table, [1, 2], None)
    manager.free(table)  # 4 free blocks, 2 of them cached
    assert manager.can_allocate(2, reusing=[0, 1]) and not manager.can_allocate(3, reusing=[0, 1])
    manager.acquire([0])
    assert manager.can_allocate(2, reusing=[0]) and not manager.can_allocate(4)
