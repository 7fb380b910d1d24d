"""Routing decisions end to end in the pure core: index, policy, load books, disaggregation."""

from __future__ import annotations

from tandem.contracts.block_hash import hash_prompt_blocks
from tandem.contracts.kv_events import BlockStored
from tandem.contracts.worker_stats import WorkerStats
from tandem.router.kv_policy import KVPolicyConfig, WorkerLoad
from tandem.router.routing import Router, RoutingConfig
from tandem.router.worker_registry import WorkerState

BLOCK = 4


def worker(worker_id: str, role: str = "decode") -> WorkerState:
    return WorkerState(worker_id, role, f"127.0.0.1:{hash(worker_id) % 1000 + 1000}", BLOCK, 64,
                       0.0)


def fill_prefill_queue(router: Router, worker_id: str, num_requests: int) -> None:
    for i in range(num_requests):
        router.loads["prefill"].on_routed(f"{worker_id}-filler-{i}", worker_id, 1, 1)


def make(mode: str = "kv", min_tokens: int = 8, max_queue: int = 2,
         overlap_weight: float = 1.0) -> Router:
    return Router(RoutingConfig(min_tokens, max_queue, KVPolicyConfig(mode, overlap_weight)),
                  BLOCK)


PROMPT = list(range(100, 124))  # 6 full blocks
HASHES = hash_prompt_blocks(PROMPT, BLOCK)


def cache(router: Router, role: str, worker_id: str, hashes: list[int]) -> None:
    router.indexes[role].add_worker(worker_id)
    assert router.indexes[role].apply(worker_id, BlockStored(0, None, tuple(hashes)))


def test_kv_mode_prefers_the_worker_holding_the_prefix_and_counts_its_load():
    router = make()
    pool = [worker("d0"), worker("d1")]
    cache(router, "decode", "d1", HASHES[:4])
    decision = router.route("r1", len(PROMPT), HASHES, pool, [])
    assert decision.decode_worker == "d1"
    assert decision.num_cached_tokens == 16 and decision.num_uncached_tokens == 8
    # d1 now carries r1's 6 blocks; another prompt with no overlap anywhere goes to d0.
    other = list(range(500, 524))
    assert router.route("r2", 24, hash_prompt_blocks(other, BLOCK), pool, []).decode_worker == "d0"
    router.on_finished("r1")
    router.on_finished("r2")
    assert router.loads["decode"].load("d1").active_blocks == 0


def test_remote_prefill_only_for_long_uncached_prompts_with_room_in_the_pool():
    router = make(min_tokens=12)
    decode_pool = [worker("d0")]
    prefill_pool = [worker("p0", "prefill"), worker("p1", "prefill")]
    fill_prefill_queue(router, "p1", 2)
    decision = router.route("r1", len(PROMPT), HASHES, decode_pool, prefill_pool)
    assert decision.prefill_worker == "p0"  # p1's queue is full
    assert router.num_inflight("prefill", "p0") == 1 and router.num_inflight("decode", "d0") == 1
    cache(router, "decode", "d0", HASHES[:4])  # now only 8 tokens are uncached on d0
    assert router.route("r2", len(PROMPT), HASHES, decode_pool, prefill_pool).prefill_worker is None
    fill_prefill_queue(router, "p0", 1)  # r1 and a filler: p0's queue is full too
    full = [worker("p0", "prefill")]
    other = list(range(700, 724))
    assert router.route("r3", 24, hash_prompt_blocks(other, BLOCK), decode_pool,
                        full).prefill_worker is None


def test_prefill_worker_chosen_by_its_own_overlap():
    router = make(min_tokens=1)
    prefill_pool = [worker("p0", "prefill"), worker("p1", "prefill")]
    cache(router, "prefill", "p1", HASHES)
    decision = router.route("r1", len(PROMPT), HASHES, [worker("d0")], prefill_pool)
    assert decision.prefill_worker == "p1"
    router.on_first_token("r1")
    assert router.loads["prefill"].load("p1").active_blocks == 0
    assert router.num_inflight("prefill", "p1") == 0 and router.num_active_requests == 1
    router.on_finished("r1")
    assert router.num_active_requests == 0


def test_round_robin_ignores_the_cache():
    router = make("round-robin")
    pool = [worker("d0"), worker("d1")]
    cache(router, "decode", "d1", HASHES)
    chosen = [router.route(f"r{i}", len(PROMPT), HASHES, pool, []).decode_worker
              for i in range(4)]
    assert chosen == ["d0", "d1", "d0", "d1"]


def test_heartbeat_stats_correct_the_books():
    router = make()
    w = worker("d0")
    router.route("r1", len(PROMPT), HASHES, [w], [])
    assert router.loads["decode"].load("d0") == WorkerLoad(6, 6)  # all 6 blocks to compute
    w.stats = WorkerStats(num_blocks=64, num_free_blocks=60)
    router.on_worker_stats(w)
    # The worker's used blocks replace the router's decode estimate; pending prefill stays.
    assert router.loads["decode"].load("d0") == WorkerLoad(6, 4)


def test_a_prefix_in_flight_counts_as_held_by_its_worker_until_the_request_ends():
    router = make(overlap_weight=3.0)
    pool = [worker("d0"), worker("d1")]
    first = router.route("r1", len(PROMPT), HASHES, pool, [])
    # Nothing is in the index yet, but the same prompt follows the first one: 3 x 0 uncached + 12
    # active blocks there beats 3 x 6 uncached + 0 active on the idle worker.
    second = router.route("r2", len(PROMPT), HASHES, pool, [])
    assert second.decode_worker == first.decode_worker and second.num_cached_tokens == 24
    router.on_finished("r1")
    router.on_finished("r2")
    assert router._pending == {} and router._pending_of == {}
    third = router.route("r3", len(PROMPT), HASHES, pool, [])
    assert third.num_cached_tokens == 0  # the index never confirmed the blocks


def test_a_pending_prefix_counts_until_the_last_request_holding_it_ends():
    router = make(overlap_weight=3.0)
    pool = [worker("d0"), worker("d1")]
    longer = hash_prompt_blocks(PROMPT + [7] * 8, BLOCK)  # PROMPT's chain and two more blocks
    other = hash_prompt_blocks([5] * 8 + PROMPT[8:], BLOCK)  # another first block
    first = router.route("r1", len(PROMPT) + 8, longer, pool, [])
    router.route("r2", len(PROMPT), HASHES, pool, [])
    assert router.route("r3", len(PROMPT) + 8, longer, pool, []).num_cached_tokens == 32
    assert router.route("r4", len(PROMPT), other, pool, []).num_cached_tokens == 0
    router.on_finished("r1")
    router.on_finished("r3")
    # r2's chain is still pending there: 6 of the longer prompt's 8 blocks.
    again = router.route("r5", len(PROMPT) + 8, longer, pool, [])
    assert again.decode_worker == first.decode_worker and again.num_cached_tokens == 24
    for request_id in ("r2", "r4", "r5"):
        router.on_finished(request_id)
    assert router._pending == {} and router._pending_of == {}


def test_totals_count_requests_tokens_and_length_classes():
    router = make()
    pool = [worker("d0")]
    cache(router, "decode", "d0", HASHES[:2])
    router.route("r1", len(PROMPT), HASHES, pool, [])          # 24 tokens, 8 of them cached
    router.route("r2", 20, hash_prompt_blocks(list(range(20)), BLOCK), pool, [])
    router.route("r3", 5, hash_prompt_blocks(list(range(300, 305)), BLOCK), pool, [])
    totals = router.totals
    assert (totals.num_requests, totals.num_prompt_tokens) == (3, 49)
    assert totals.num_cached_prompt_tokens == 8
    # 16-31 tokens are class 5, 4-7 tokens class 3.
    assert totals.by_length_class == {5: [2, 44], 3: [1, 5]}
