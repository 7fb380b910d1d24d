"""Snapshots with parent links rebuild the same index as the events did, as chained runs."""

from __future__ import annotations

from tandem.contracts.block_hash import hash_prompt_blocks
from tandem.engine.block_manager import BlockManager
from tandem.router.kv_index import KVIndex


def test_snapshot_with_parents_answers_like_the_event_stream():
    manager = BlockManager(64, 4)
    live, rebuilt = KVIndex(), KVIndex()
    live.add_worker("w")
    rebuilt.add_worker("w")
    manager.subscribe(lambda event: live.apply("w", event))
    prompts = [list(range(0, 40)), list(range(0, 20)) + list(range(500, 520)), list(range(900, 932))]
    for prompt in prompts:
        hashes = hash_prompt_blocks(prompt, 4)
        blocks = manager.allocate(len(hashes))
        cached = manager.match_prefix(hashes)
        new = len(cached)
        manager.cache_blocks(blocks[new:], hashes[new:], hashes[new - 1] if new else None)
    hashes, parents = manager.cached_hashes()
    rebuilt.load_snapshot("w", manager.next_event_id - 1, hashes, parents)
    for prompt in prompts + [list(range(0, 24)), list(range(0, 20)) + [1, 2, 3, 4]]:
        query = hash_prompt_blocks(prompt, 4)
        assert rebuilt.overlaps(query) == live.overlaps(query)
    assert all(run.is_chain for run in rebuilt._runs if run is not None)
    assert rebuilt.num_blocks("w") == live.num_blocks("w") == len(hashes)
