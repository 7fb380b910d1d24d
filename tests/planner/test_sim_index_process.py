"""The router's KV indexes in a helper process answer exactly as the in-process ones do."""

from __future__ import annotations

import random
from functools import partial

import pytest

from tandem.contracts.block_hash import hash_prompt_blocks
from tandem.contracts.kv_events import BlockStored
from tandem.engine.block_manager import BlockManager
from tandem.planner.sim_index_process import IndexProcess
from tandem.planner.simulator import Simulator
from tandem.router.kv_index import KVIndex
from tandem.router.routing import RoutingConfig
from tests.planner.test_simulator import ConstantModel, config, requests

BLOCK = 4


@pytest.fixture
def process():
    process = IndexProcess()
    yield process
    process.close()


def test_a_remote_index_answers_as_a_local_one(process):
    local = {"decode": KVIndex(), "prefill": KVIndex()}
    managers = []
    for role in ("decode", "prefill"):
        for k in range(2):
            worker_id = f"{role}-{k}"
            manager = BlockManager(40, BLOCK)
            for indexes in (local, process.indexes):
                indexes[role].add_worker(worker_id)
                manager.subscribe(partial(indexes[role].apply, worker_id))
            managers.append(manager)
    rng = random.Random(0)
    # Prompts that share prefixes (segments in common), 1 to 24 blocks long.
    segments = [[rng.randrange(16, 1000) for _ in range(BLOCK * rng.randint(1, 8))]
                for _ in range(6)]
    prompts = [hash_prompt_blocks(sum(rng.sample(segments, 3), []), BLOCK) for _ in range(12)]
    num_answers = 0
    for step in range(400):
        manager = rng.choice(managers)
        hashes = rng.choice(prompts)
        cached = manager.match_prefix(hashes)
        if not manager.can_allocate(len(hashes) - len(cached), reusing=cached):
            continue
        manager.acquire(cached)
        table = cached + manager.allocate(len(hashes) - len(cached))
        manager.cache_blocks(table[len(cached):], hashes[len(cached):],
                             hashes[len(cached) - 1] if cached else None)
        manager.free(table)
        if step == 200:
            assert manager.reset_prefix_cache()  # an AllBlocksCleared event
        query = rng.choice(prompts)
        for role in ("decode", "prefill"):  # the second query of a prompt is answered already
            answer = process.indexes[role].overlaps(query)
            assert answer == local[role].overlaps(query)
            assert list(answer) == list(local[role].overlaps(query))  # in the same order
            num_answers += bool(answer)
    assert num_answers > 100


def test_an_event_out_of_sequence_fails_the_next_query(process):
    index = process.indexes["decode"]
    index.add_worker("decode-0")
    index.apply("decode-0", BlockStored(1, None, (5,)))  # event 0 expected
    with pytest.raises(RuntimeError, match="out of sequence"):
        index.overlaps([5])


@pytest.mark.parametrize("num_prefill", [2, 0])
def test_a_simulation_with_the_index_process_is_the_same(num_prefill):
    reqs = requests([(10, 9), (7, 30), (13, 25), (5, 40), (9, 3), (6, 35), (10, 28), (30, 4)])
    offsets = [0.0, 0.0, 0.01, 0.02, 0.05, 0.3, 0.31, 0.32]
    runs = []
    for in_process in (True, False):
        sim = Simulator(config(num_prefill, 2, num_kv_blocks=40, kv_index_process=not in_process,
                               routing=RoutingConfig(remote_prefill_min_tokens=8)),
                        ConstantModel())
        try:
            result = sim.run(reqs, offsets)
            runs.append(([(r.token_times_s, r.cached_tokens, r.decode_worker.worker_id,
                           r.prefill_worker and r.prefill_worker.worker_id)
                          for r in result.requests],
                         sim.router.indexes["decode"].overlaps(sim.requests[1].block_hashes)))
        finally:
            sim.close()
    assert runs[0] == runs[1]
    assert any(prefill for *_, prefill in runs[0][0]) == (num_prefill > 0)
