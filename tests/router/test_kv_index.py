"""KV index: exact overlaps from KV events, gaps, snapshots, and agreement with the engine."""

from __future__ import annotations

import random

import pytest

from tandem.contracts.block_hash import hash_prompt_blocks
from tandem.engine.block_manager import BlockManager
from tandem.contracts.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from tandem.router import kv_index
from tandem.router.kv_index import KVIndex

BLOCK_SIZE = 4


def chain(*token_runs: list[int]) -> list[int]:
    """Chained hashes of the concatenated tokens (one hash per 4-token block)."""
    return hash_prompt_blocks([t for run in token_runs for t in run], BLOCK_SIZE)


SYSTEM = list(range(100, 116))                       # 4 blocks shared by every prompt below
PROMPT_A = chain(SYSTEM, list(range(200, 224)))      # system + 6 blocks of its own
PROMPT_B = chain(SYSTEM, list(range(300, 308)))      # system + 2 other blocks


def index_with(*workers: str) -> KVIndex:
    index = KVIndex()
    for worker_id in workers:
        index.add_worker(worker_id)
    return index


def test_stored_events_give_each_worker_its_prefix_length():
    index = index_with("w0", "w1", "w2")
    assert index.apply("w0", BlockStored(0, None, tuple(PROMPT_A)))
    assert index.apply("w1", BlockStored(0, None, tuple(PROMPT_B[:4])))
    assert index.apply("w1", BlockStored(1, PROMPT_B[3], tuple(PROMPT_B[4:])))
    assert index.overlaps(PROMPT_A) == {"w0": 10, "w1": 4}    # w2 holds nothing: omitted
    assert index.overlaps(PROMPT_B) == {"w0": 4, "w1": 6}
    assert index.overlaps(PROMPT_A[:7]) == {"w0": 7, "w1": 4}
    assert index.overlap_blocks("w1", PROMPT_A) == 4
    assert index.overlap_blocks("w2", PROMPT_A) == 0
    assert index.overlap_blocks("nobody", PROMPT_A) == 0
    assert index.overlaps(chain(list(range(900, 916)))) == {}
    assert index.overlaps([]) == {}
    assert [index.num_blocks(w) for w in ("w0", "w1", "w2")] == [10, 6, 0]
    assert index.workers() == ["w0", "w1", "w2"]


def test_removed_blocks_cut_the_prefix_where_they_were():
    index = index_with("w0", "w1")
    index.apply("w0", BlockStored(0, None, tuple(PROMPT_A)))
    index.apply("w1", BlockStored(0, None, tuple(PROMPT_A)))
    assert index.apply("w0", BlockRemoved(1, tuple(reversed(PROMPT_A[7:]))))  # tail first, as LRU
    assert index.overlaps(PROMPT_A) == {"w0": 7, "w1": 10}
    assert index.apply("w1", BlockRemoved(1, (PROMPT_A[2],)))                 # a hole mid-prefix
    assert index.overlaps(PROMPT_A) == {"w0": 7, "w1": 2}
    assert index.apply("w0", BlockRemoved(2, (PROMPT_A[5], 12345)))          # unknown hash: ignored
    assert index.overlaps(PROMPT_A) == {"w0": 5, "w1": 2}
    assert index.num_blocks("w0") == 6 and index.num_blocks("w1") == 9


def test_a_worker_holding_a_later_block_but_not_the_first_has_overlap_zero():
    index = index_with("w0", "w1")
    index.apply("w0", BlockStored(0, PROMPT_A[2], tuple(PROMPT_A[3:6])))
    index.apply("w1", BlockStored(0, None, tuple(PROMPT_A[:2])))
    assert index.overlaps(PROMPT_A) == {"w1": 2}
    assert index.overlap_blocks("w0", PROMPT_A) == 0
    assert index.overlaps(PROMPT_A[3:]) == {"w0": 3}   # the hashes themselves are held


def test_cleared_event_empties_one_worker_only():
    index = index_with("w0", "w1")
    index.apply("w0", BlockStored(0, None, tuple(PROMPT_A)))
    index.apply("w1", BlockStored(0, None, tuple(PROMPT_B)))
    assert index.apply("w0", AllBlocksCleared(1))
    assert index.overlaps(PROMPT_A) == {"w1": 4}
    assert index.num_blocks("w0") == 0
    assert index.apply("w0", BlockStored(2, None, tuple(PROMPT_A[:3])))
    assert index.overlaps(PROMPT_A) == {"w0": 3, "w1": 4}


def test_an_event_out_of_sequence_is_refused_and_changes_nothing():
    index = index_with("w0")
    assert not index.apply("w0", BlockStored(1, None, tuple(PROMPT_A)))   # 0 expected first
    assert index.overlaps(PROMPT_A) == {} and index.last_event_id("w0") == -1
    assert index.apply("w0", BlockStored(0, None, tuple(PROMPT_A[:5])))
    assert not index.apply("w0", BlockRemoved(2, tuple(PROMPT_A)))       # 1 was missed
    assert not index.apply("w0", AllBlocksCleared(0))                    # a restarted worker
    assert not index.apply("w0", BlockStored(0, None, tuple(PROMPT_B)))
    assert index.overlaps(PROMPT_A) == {"w0": 5} and index.overlaps(PROMPT_B) == {"w0": 4}
    assert index.num_blocks("w0") == 5 and index.last_event_id("w0") == 0


def test_apply_many_stops_at_the_first_gap():
    index = index_with("w0")
    events = [BlockStored(0, None, tuple(PROMPT_A[:2])),
              BlockStored(1, PROMPT_A[1], (PROMPT_A[2],)),
              BlockStored(3, PROMPT_A[2], (PROMPT_A[3],)),   # 2 is missing
              BlockStored(4, PROMPT_A[3], (PROMPT_A[4],))]
    assert not index.apply_many("w0", events)
    assert index.overlap_blocks("w0", PROMPT_A) == 3 and index.last_event_id("w0") == 1
    assert index.apply_many("w0", [])


def test_snapshot_replaces_the_workers_blocks_then_events_continue():
    index = index_with("w0", "w1")
    index.apply("w0", BlockStored(0, None, tuple(PROMPT_A)))
    index.apply("w1", BlockStored(0, None, tuple(PROMPT_A)))
    assert not index.apply("w0", BlockStored(7, None, tuple(PROMPT_B)))
    # The worker's cache as of its event 9, listed in any order.
    index.load_snapshot("w0", 9, [PROMPT_B[5], PROMPT_B[0], PROMPT_B[4], PROMPT_B[1],
                                  PROMPT_B[3], PROMPT_B[2], PROMPT_A[6]])
    assert index.overlaps(PROMPT_A) == {"w0": 4, "w1": 10}
    assert index.overlaps(PROMPT_B) == {"w0": 6, "w1": 4}
    assert index.num_blocks("w0") == 7 and index.last_event_id("w0") == 9
    assert not index.apply("w0", BlockRemoved(9, (PROMPT_B[0],)))
    assert index.apply("w0", BlockRemoved(10, (PROMPT_B[5],)))
    assert index.overlaps(PROMPT_B) == {"w0": 5, "w1": 4}


def test_snapshot_of_a_worker_that_sent_no_event_yet():
    index = index_with("w0")
    index.load_snapshot("w0", -1, PROMPT_A[:4])
    assert index.overlaps(PROMPT_A) == {"w0": 4}
    assert index.apply("w0", BlockStored(0, PROMPT_A[3], tuple(PROMPT_A[4:6])))
    assert index.overlaps(PROMPT_A) == {"w0": 6}
    with pytest.raises(ValueError, match="last_event_id"):
        index.load_snapshot("w0", -2, [])


def test_remove_worker_drops_its_blocks_and_a_new_worker_starts_empty():
    index = index_with("w0", "w1")
    index.apply("w0", BlockStored(0, None, tuple(PROMPT_A)))
    index.apply("w1", BlockStored(0, None, tuple(PROMPT_A[:3])))
    index.remove_worker("w0")
    index.remove_worker("w0")                       # unknown ids are ignored
    assert index.overlaps(PROMPT_A) == {"w1": 3}
    assert index.workers() == ["w1"] and index.num_blocks("w0") == 0
    index.add_worker("w2")                          # takes w0's bit, none of its blocks
    assert index.overlaps(PROMPT_A) == {"w1": 3}
    assert index.apply("w2", BlockStored(0, None, tuple(PROMPT_A[:1])))
    assert index.overlaps(PROMPT_A) == {"w1": 3, "w2": 1}
    with pytest.raises(ValueError, match="add_worker"):
        index.apply("w0", BlockStored(1, None, tuple(PROMPT_A)))


def test_adding_a_known_worker_again_starts_it_afresh():
    index = index_with("w0")
    index.apply("w0", BlockStored(0, None, tuple(PROMPT_A)))
    index.add_worker("w0")
    assert index.overlaps(PROMPT_A) == {} and index.last_event_id("w0") == -1
    assert index.apply("w0", BlockStored(0, None, tuple(PROMPT_B)))
    assert index.overlaps(PROMPT_B) == {"w0": 6}


def test_storing_a_held_block_again_changes_nothing():
    index = index_with("w0")
    index.apply("w0", BlockStored(0, None, tuple(PROMPT_A[:4])))
    index.apply("w0", BlockStored(1, None, tuple(PROMPT_A[:6])))
    assert index.overlaps(PROMPT_A) == {"w0": 6} and index.num_blocks("w0") == 6


@pytest.mark.parametrize("built_from", ["events", "snapshot"])
@pytest.mark.parametrize("num_agreeing", [1, 2, 16, 17, 80, 150, 199, 200])
def test_a_long_run_matches_exactly_where_the_prompt_leaves_it(built_from, num_agreeing):
    tokens = list(range(1000, 1800))                       # 200 blocks in one run
    cached = chain(tokens)
    index = index_with("w0", "w1")
    if built_from == "events":                             # chained runs: bisection on hashes
        for event_id, start in enumerate(range(0, 200, 40)):
            parent = cached[start - 1] if start else None
            index.apply("w0", BlockStored(event_id, parent, tuple(cached[start:start + 40])))
    else:                                                  # snapshot order: compared hash by hash
        index.load_snapshot("w0", 4, cached)
    index.apply("w1", BlockStored(0, None, tuple(cached[:120])))
    prompt = chain(tokens[:4 * num_agreeing], list(range(5000, 5000 + 4 * (210 - num_agreeing))))
    assert prompt[:num_agreeing] == cached[:num_agreeing] and len(prompt) == 210
    assert index.overlaps(prompt) == {"w0": num_agreeing, "w1": min(num_agreeing, 120)}
    assert index.overlaps(prompt[:num_agreeing]) == {"w0": num_agreeing,
                                                    "w1": min(num_agreeing, 120)}


def test_a_snapshot_out_of_chain_order_is_still_exact():
    other = chain(list(range(700, 704)))[0]
    index = index_with("w0")
    # Listed next to each other, yet A[1] is missing: the run must not be taken for a chain.
    index.load_snapshot("w0", 0, [PROMPT_A[0], other, *PROMPT_A[2:8]])
    assert index.overlaps(PROMPT_A) == {"w0": 1}
    assert index.overlaps(PROMPT_A[2:]) == {"w0": 6}
    assert index.apply("w0", BlockStored(1, PROMPT_A[0], (PROMPT_A[1],)))
    assert index.overlaps(PROMPT_A) == {"w0": 8}


def test_forgetting_every_block_leaves_nothing_behind():
    index = index_with("w0", "w1")
    index.apply("w0", BlockStored(0, None, tuple(PROMPT_A)))
    index.apply("w1", BlockStored(0, None, tuple(PROMPT_B)))
    index.apply("w0", BlockRemoved(1, tuple(reversed(PROMPT_A[2:]))))
    index.remove_worker("w1")
    assert len(index._slots) == 2                 # A's first two blocks, nothing dead
    index.apply("w0", AllBlocksCleared(2))
    assert index._slots == {} and all(run is None for run in index._runs)


class SetModel:
    """The obviously right index: a set of hashes per worker, walked block by block."""

    def __init__(self) -> None:
        self.held: dict[str, set[int]] = {}

    def overlaps(self, block_hashes: list[int]) -> dict[str, int]:
        result = {}
        for worker_id, held in self.held.items():
            depth = 0
            while depth < len(block_hashes) and block_hashes[depth] in held:
                depth += 1
            if depth:
                result[worker_id] = depth
        return result


def test_random_events_in_any_order_agree_with_a_set_per_worker():
    rng = random.Random(7)
    trunk = [rng.getrandbits(64) for _ in range(40)]
    branches = [trunk[:rng.randrange(41)] + [rng.getrandbits(64) for _ in range(rng.randrange(30))]
                for _ in range(12)]
    index, model = KVIndex(), SetModel()
    next_ids = {}
    for worker_id in ("w0", "w1", "w2", "w3"):
        index.add_worker(worker_id)
        model.held[worker_id] = set()
        next_ids[worker_id] = 0
    for step in range(600):
        worker_id = rng.choice(sorted(model.held))
        held = model.held[worker_id]
        branch = rng.choice(branches)
        start, stop = sorted(rng.sample(range(len(branch) + 1), 2))
        kind = rng.random()
        if kind < 0.55:
            piece = branch[start:stop]
            event = BlockStored(next_ids[worker_id], branch[start - 1] if start else None,
                                tuple(piece))
            held.update(piece)
        elif kind < 0.93:
            piece = rng.sample(sorted(held), min(len(held), rng.randrange(1, 12))) if held else []
            event = BlockRemoved(next_ids[worker_id], tuple(piece))
            held.difference_update(piece)
        elif kind < 0.97:
            event = AllBlocksCleared(next_ids[worker_id])
            held.clear()
        else:
            snapshot = sorted(held | set(rng.sample(branch, len(branch) // 2)))
            rng.shuffle(snapshot)
            index.load_snapshot(worker_id, next_ids[worker_id] - 1, snapshot)
            held.clear()
            held.update(snapshot)
            continue
        assert index.apply(worker_id, event)
        next_ids[worker_id] += 1
        for prompt in branches + [trunk]:
            assert index.overlaps(prompt) == model.overlaps(prompt), f"step {step}"
        assert all(index.num_blocks(w) == len(h) for w, h in model.held.items())


def test_overlaps_agree_with_each_engines_own_prefix_match_under_eviction():
    rng = random.Random(3)
    documents = [[rng.randrange(50_000) for _ in range(rng.randrange(8, 40))] for _ in range(6)]
    managers = {f"w{i}": BlockManager(num_blocks=48, block_size=BLOCK_SIZE) for i in range(3)}
    index = KVIndex()
    for worker_id, manager in managers.items():
        index.add_worker(worker_id)
        manager.subscribe(lambda event, w=worker_id: assert_applied(index, w, event))
    running: dict[str, list[list[int]]] = {w: [] for w in managers}
    prompts = []
    for _ in range(400):
        worker_id = rng.choice(sorted(managers))
        manager = managers[worker_id]
        tokens = rng.choice(documents) + [rng.randrange(50_000) for _ in range(rng.randrange(24))]
        hashes = hash_prompt_blocks(tokens, BLOCK_SIZE)
        prompts.append(hashes)
        matched = manager.match_prefix(hashes)
        if manager.can_allocate(len(hashes) - len(matched)):
            manager.acquire(matched)
            new_blocks = manager.allocate(len(hashes) - len(matched))
            parent = hashes[len(matched) - 1] if matched else None
            manager.cache_blocks(new_blocks, hashes[len(matched):], parent)
            running[worker_id].append(matched + new_blocks)
        while running[worker_id] and (rng.random() < 0.6 or not manager.num_free_blocks):
            manager.free(running[worker_id].pop(rng.randrange(len(running[worker_id]))))
        for hashes in rng.sample(prompts, min(len(prompts), 8)):
            expected = {w: len(m.match_prefix(hashes)) for w, m in managers.items()}
            assert index.overlaps(hashes) == {w: n for w, n in expected.items() if n}
    assert all(index.num_blocks(w) == len(m.cached_hashes()[0]) for w, m in managers.items())


def assert_applied(index: KVIndex, worker_id: str, event) -> None:
    assert index.apply(worker_id, event), f"{worker_id} refused {event}"


def test_bulk_paths_leave_the_same_index_as_block_by_block(monkeypatch):
    """Eviction spans and fresh chains take bulk paths; the index must be what the per-hash
    loops build, slot for slot."""
    def build(bulk: bool) -> tuple:
        if not bulk:
            monkeypatch.setattr(KVIndex, "_forget_span", lambda self, worker, block_hashes: False)
            monkeypatch.setattr(KVIndex, "_mark_span", lambda self, worker, codes: False)
            monkeypatch.setattr(KVIndex, "_store_fresh", lambda self, worker, parent, hashes: False)
            monkeypatch.setattr(kv_index, "pop_lone_tail", lambda run, offset, bit: False)
        rng = random.Random(5)
        documents = [[rng.randrange(50_000) for _ in range(rng.randrange(8, 60))]
                     for _ in range(5)]
        managers = {f"w{i}": BlockManager(num_blocks=40, block_size=BLOCK_SIZE) for i in range(3)}
        index = KVIndex()
        for worker_id, manager in managers.items():
            index.add_worker(worker_id)
            manager.subscribe(lambda event, w=worker_id: assert_applied(index, w, event))
        held = {w: [] for w in managers}
        for _ in range(300):
            worker_id = rng.choice(sorted(managers))
            manager = managers[worker_id]
            tokens = rng.choice(documents) + [rng.randrange(50_000) for _ in range(rng.randrange(40))]
            hashes = hash_prompt_blocks(tokens, BLOCK_SIZE)
            matched = manager.match_prefix(hashes)
            while held[worker_id] and not manager.can_allocate(len(hashes) - len(matched), matched):
                manager.free(held[worker_id].pop(0))
            if manager.can_allocate(len(hashes) - len(matched), matched):
                manager.acquire(matched)
                new_blocks = manager.allocate(len(hashes) - len(matched))
                manager.cache_blocks(new_blocks, hashes[len(matched):],
                                     hashes[len(matched) - 1] if matched else None)
                held[worker_id].append(matched + new_blocks)
        runs = [(r.hashes, r.masks, r.breaks, r.num_live_slots, r.is_chain) if r else None
                for r in index._runs]
        return index._slots, runs, {w: index.num_blocks(w) for w in managers}
    spans, marks, fresh = [], [], []
    original, original_mark = KVIndex._forget_span, KVIndex._mark_span
    original_fresh = KVIndex._store_fresh
    monkeypatch.setattr(KVIndex, "_store_fresh", lambda self, worker, parent, hashes: fresh.append(
        original_fresh(self, worker, parent, hashes)) or fresh[-1])
    monkeypatch.setattr(KVIndex, "_forget_span",
                        lambda self, worker, hashes: spans.append(original(self, worker, hashes))
                        or spans[-1])
    monkeypatch.setattr(KVIndex, "_mark_span",
                        lambda self, worker, codes: marks.append(original_mark(self, worker, codes))
                        or marks[-1])
    lone_tails = []
    original_lone_tail = kv_index.pop_lone_tail
    monkeypatch.setattr(kv_index, "pop_lone_tail", lambda run, offset, bit: lone_tails.append(
        original_lone_tail(run, offset, bit)) or lone_tails[-1])
    bulk = build(bulk=True)
    assert any(spans) and any(marks) and any(fresh) and not all(fresh)
    assert any(lone_tails) and not all(lone_tails)
    assert bulk == build(bulk=False)


def test_one_eviction_of_several_prompt_tails_takes_the_span_path(monkeypatch):
    """An allocation evicts LRU order: one prompt's tail, last block first, then the next's.
    Each stretch is forgotten in bulk, and the index is what the hash-by-hash loop leaves."""
    rng = random.Random(11)
    first, second = ([rng.getrandbits(64) for _ in range(30)] for _ in range(2))
    evicted = tuple(reversed(first[18:])) + tuple(reversed(second[5:]))

    def build(bulk: bool) -> tuple:
        index = index_with("w0", "w1")
        index.apply("w0", BlockStored(0, None, tuple(first)))
        index.apply("w0", BlockStored(1, None, tuple(second)))
        index.apply("w1", BlockStored(0, None, tuple(first[:20])))
        calls = []
        original = KVIndex._forget_span
        monkeypatch.setattr(KVIndex, "_forget_span", lambda self, worker, hashes: calls.append(
            bulk and original(self, worker, hashes)) or calls[-1])
        assert index.apply("w0", BlockRemoved(2, evicted))
        runs = [(r.hashes, r.masks, r.breaks, r.num_live_slots) if r else None
                for r in index._runs]
        return calls, (index._slots, runs, index.num_blocks("w0"), index.overlaps(first),
                       index.overlaps(second))

    bulk_calls, bulk = build(bulk=True)
    loop_calls, loop = build(bulk=False)
    assert bulk_calls == [True] and loop_calls == [False]
    assert bulk == loop
    assert bulk[3] == {"w0": 18, "w1": 20} and bulk[4] == {"w0": 5}


@pytest.mark.parametrize("order", ["descending", "ascending", "mixed", "scattered", "repeated"])
def test_stretches_found_by_one_lookup_each_match_the_hash_by_hash_loop(monkeypatch, order):
    rng = random.Random(13)
    first, second = ([rng.getrandbits(64) for _ in range(40)] for _ in range(2))
    evicted = {"descending": first[:5:-1] + second[:9:-1],
               "ascending": first[10:] + second[3:30],
               "mixed": first[20:] + second[:10:-1] + [first[2]],
               "scattered": first[::3] + second[::2],
               "repeated": first[30:] + first[35:]}[order]

    def build(bulk: bool) -> tuple:
        index = index_with("w0", "w1")
        index.apply("w0", BlockStored(0, None, tuple(first)))
        index.apply("w0", BlockStored(1, None, tuple(second)))
        index.apply("w1", BlockStored(0, None, tuple(first[:25])))
        if not bulk:
            monkeypatch.setattr(KVIndex, "_forget_span", lambda self, worker, hashes: False)
        assert index.apply("w0", BlockRemoved(2, tuple(evicted)))
        runs = [(r.hashes, r.masks, r.breaks, r.num_live_slots) if r else None
                for r in index._runs]
        return (index._slots, runs, index._free_run_ids, index.num_blocks("w0"),
                index.overlaps(first), index.overlaps(second))

    assert build(bulk=True) == build(bulk=False)


def test_a_fresh_chain_meeting_a_held_hash_is_undone_and_stored_hash_by_hash(monkeypatch):
    """The one-update path for fresh chains proves them new by the dict's growth; when a later
    hash is held after all (a worker keeping a block but not its parent), the update is undone
    and the event stored as the hash-by-hash loop stores it."""
    rng = random.Random(17)
    held, fresh = ([rng.getrandbits(64) for _ in range(12)] for _ in range(2))

    def build(bulk: bool) -> tuple:
        index = index_with("w0", "w1")
        index.apply("w0", BlockStored(0, None, tuple(held)))
        index.apply("w0", BlockRemoved(1, tuple(held[:3])))  # held[3:] stays, its parents gone
        if not bulk:
            monkeypatch.setattr(KVIndex, "_store_fresh", lambda self, worker, parent, hashes: False)
        results = [index.apply("w1", BlockStored(0, None, tuple(fresh[:2] + held[5:9]))),
                   index.apply("w1", BlockStored(1, held[8], tuple(fresh[2:]))),
                   index.apply("w0", BlockStored(2, held[-1], (fresh[0],)))]
        runs = [(r.hashes, r.masks, r.breaks, r.num_live_slots) if r else None
                for r in index._runs]
        return results, index._slots, runs, index.num_blocks("w1"), index.overlaps(held)

    assert build(bulk=True) == build(bulk=False)
