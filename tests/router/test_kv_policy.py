"""KV routing policy: exact costs and winners, ties, sampling, baselines, load bookkeeping."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from tandem.router.kv_policy import (ActiveLoadTracker, KVPolicyConfig, KVRouterPolicy,
                                     RouterMode, RoutingChoice, WorkerLoad, sampling_weights)


def policy(**config) -> KVRouterPolicy:
    """A policy whose overlap weight is 1 unless given: the cost arithmetic below reads plainly."""
    return KVRouterPolicy(KVPolicyConfig(**{"overlap_weight": 1.0, **config}))


@pytest.mark.parametrize("config, message", [
    (dict(mode="cache"), "router mode"),
    (dict(overlap_weight=-1.0), "overlap_weight"),
    (dict(overlap_weight=math.inf), "overlap_weight"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
])
def test_config_rejects_bad_values_with_a_message(config, message):
    with pytest.raises(ValueError, match=message):
        KVPolicyConfig(**config)


def test_modes_are_the_documented_strings():
    assert [m.value for m in RouterMode] == ["kv", "round-robin", "random", "least-loaded"]
    assert KVRouterPolicy(KVPolicyConfig(mode="least-loaded")).mode is RouterMode.LEAST_LOADED


def test_cost_trades_uncached_blocks_against_active_blocks():
    overlaps = {"a": 8}
    loads = {"a": WorkerLoad(active_prefill_blocks=2, active_decode_blocks=5)}
    # a: 1.0 * (10 - 8) + 2 + 5 = 9; b: 1.0 * 10 + 0 = 10.
    assert policy().costs(["a", "b"], 10, overlaps, loads) == [9.0, 10.0]
    assert policy().choose(["a", "b"], 10, overlaps, loads) == RoutingChoice("a", 8, 9.0)
    # Uncached blocks worth half: a: 0.5 * 2 + 7 = 8; b: 0.5 * 10 = 5, so load wins.
    assert policy(overlap_weight=0.5).choose(["a", "b"], 10, overlaps, loads) == \
        RoutingChoice("b", 0, 5.0)
    # Worth three: a: 6 + 7 = 13; b: 30.
    assert policy(overlap_weight=3.0).choose(["a", "b"], 10, overlaps, loads) == \
        RoutingChoice("a", 8, 13.0)


def test_overlap_beyond_the_prompt_costs_nothing_more():
    assert policy().costs(["a"], 4, {"a": 6}, {}) == [0.0]


def test_ties_go_to_the_candidate_listed_first():
    loads = {"a": WorkerLoad(0, 3), "b": WorkerLoad(1, 2)}
    assert policy().choose(["b", "a", "c"], 5, {"a": 3, "b": 3}, loads).worker_id == "b"
    assert policy().choose(["a", "b", "c"], 5, {"a": 3, "b": 3}, loads).worker_id == "a"
    assert policy().choose(["c", "d"], 5, {}, {}).worker_id == "c"


def test_temperature_zero_is_deterministic():
    kv = policy(temperature=0.0, seed=1)
    choices = {kv.choose(["a", "b", "c"], 8, {"b": 4, "c": 3}, {}).worker_id for _ in range(50)}
    assert choices == {"b"}


def test_sampling_weights_follow_the_formula():
    weights = sampling_weights([10.0, 15.0, 20.0], temperature=0.5)
    assert weights == pytest.approx([1.0, math.exp(-1.0), math.exp(-2.0)])
    assert sampling_weights([3.0, 3.0, 3.0], temperature=2.0) == [1.0, 0.0, 0.0]


def test_temperature_sampling_frequencies_follow_the_weights():
    kv = policy(temperature=0.5, seed=1234)
    # costs: a 10, b 15, c 20 (all uncached, no load)
    overlaps = {"a": 10, "b": 5}
    counts = Counter(kv.choose(["a", "b", "c"], 20, overlaps, {}).worker_id
                     for _ in range(20_000))
    weights = [1.0, math.exp(-1.0), math.exp(-2.0)]
    expected = [w / sum(weights) for w in weights]
    observed = [counts[w] / 20_000 for w in "abc"]
    assert observed == pytest.approx(expected, abs=0.015)


def test_temperature_with_all_costs_equal_is_a_tie_for_the_first():
    kv = policy(temperature=1.0, seed=5)
    assert {kv.choose(["b", "a"], 4, {}, {}).worker_id for _ in range(20)} == {"b"}


def test_round_robin_rotates_through_the_candidates():
    rr = policy(mode="round-robin")
    picks = [rr.choose(["a", "b", "c"], 4, {"c": 4}, {}).worker_id for _ in range(7)]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]
    choice = rr.choose(["a", "b", "c"], 4, {"c": 4}, {"b": WorkerLoad(1, 2)})
    assert choice == RoutingChoice("b", 0, 7.0)  # the cost is still reported on the kv scale


def test_least_loaded_takes_the_fewest_active_blocks_ties_first():
    ll = policy(mode="least-loaded")
    loads = {"a": WorkerLoad(4, 0), "b": WorkerLoad(0, 3), "c": WorkerLoad(1, 2)}
    assert ll.choose(["a", "b", "c"], 4, {"a": 4}, loads).worker_id == "b"
    assert ll.choose(["a", "c", "b"], 4, {"a": 4}, loads).worker_id == "c"
    assert ll.choose(["a", "b", "d"], 4, {}, loads).worker_id == "d"  # unknown: idle


def test_random_is_uniform_and_reproducible_with_a_seed():
    first, second = policy(mode="random", seed=42), policy(mode="random", seed=42)
    candidates = ["a", "b", "c", "d"]
    picks = [first.choose(candidates, 1, {}, {}).worker_id for _ in range(8000)]
    assert picks == [second.choose(candidates, 1, {}, {}).worker_id for _ in range(8000)]
    counts = Counter(picks)
    assert all(abs(counts[w] / 8000 - 0.25) < 0.02 for w in candidates)


def test_choose_rejects_an_empty_pool_and_negative_prompts():
    with pytest.raises(ValueError, match="no candidate"):
        policy().choose([], 3, {}, {})
    with pytest.raises(ValueError, match="prompt_blocks"):
        policy().choose(["a"], -1, {}, {})


def test_tracker_counts_a_request_from_routing_to_finish():
    tracker = ActiveLoadTracker()
    tracker.on_routed("r1", "w0", prompt_blocks=10, uncached_blocks=6)
    assert tracker.load("w0") == WorkerLoad(active_prefill_blocks=6, active_decode_blocks=10)
    tracker.on_routed("r2", "w0", prompt_blocks=4, uncached_blocks=4)
    tracker.on_routed("r3", "w1", prompt_blocks=2, uncached_blocks=0)
    assert tracker.load("w0") == WorkerLoad(10, 14) and tracker.load("w1") == WorkerLoad(0, 2)
    tracker.on_first_token("r1")
    tracker.on_first_token("r1")
    assert tracker.load("w0") == WorkerLoad(4, 14)
    tracker.on_tokens("r1", 2)
    assert tracker.load("w0") == WorkerLoad(4, 16)
    tracker.on_finished("r1")
    tracker.on_finished("r1")                        # idempotent
    assert tracker.load("w0") == WorkerLoad(4, 4)
    tracker.on_finished("r2")                        # aborted before its first token
    tracker.on_first_token("r2")                     # a late event for it is ignored
    tracker.on_tokens("r2", 3)
    assert tracker.load("w0") == WorkerLoad(0, 0)
    assert dict(tracker.loads()) == {"w0": WorkerLoad(0, 0), "w1": WorkerLoad(0, 2)}
    assert tracker.num_active_requests() == 1
    assert tracker.load("never-seen") == WorkerLoad(0, 0)


def test_tracker_rejects_inconsistent_routing():
    tracker = ActiveLoadTracker()
    tracker.on_routed("r1", "w0", 4, 2)
    with pytest.raises(ValueError, match="already routed"):
        tracker.on_routed("r1", "w1", 4, 2)
    with pytest.raises(ValueError, match="uncached_blocks"):
        tracker.on_routed("r2", "w0", 4, 5)
    with pytest.raises(ValueError, match="num_new_blocks"):
        tracker.on_tokens("r1", -1)
    with pytest.raises(ValueError, match="reported"):
        tracker.correct("w0", -3)
    assert tracker.load("w0") == WorkerLoad(2, 4)


def test_a_worker_report_replaces_the_decode_total_and_later_changes_apply_on_top():
    tracker = ActiveLoadTracker()
    tracker.on_routed("r1", "w0", prompt_blocks=10, uncached_blocks=10)
    tracker.correct("w0", 6)                         # e.g. shared blocks pinned once
    assert tracker.load("w0") == WorkerLoad(10, 6)   # prefill blocks are not corrected
    tracker.on_routed("r2", "w0", prompt_blocks=5, uncached_blocks=1)
    assert tracker.load("w0") == WorkerLoad(11, 11)
    tracker.on_finished("r1")
    assert tracker.load("w0") == WorkerLoad(1, 1)
    tracker.on_finished("r2")
    assert tracker.load("w0") == WorkerLoad(0, 0)    # -4 clamped until the next report
    tracker.correct("w0", 3)                         # blocks held for requests routed elsewhere
    assert tracker.load("w0") == WorkerLoad(0, 3)
    tracker.correct("w9", 7)
    assert tracker.load("w9") == WorkerLoad(0, 7)


def test_removing_a_worker_drops_its_requests_and_load():
    tracker = ActiveLoadTracker()
    tracker.on_routed("r1", "w0", 8, 8)
    tracker.on_routed("r2", "w1", 3, 3)
    view = tracker.loads()
    tracker.remove_worker("w0")
    assert "w0" not in view and tracker.load("w0") == WorkerLoad(0, 0)
    tracker.on_finished("r1")
    tracker.on_routed("r1", "w1", 2, 0)              # the id is free again
    assert tracker.load("w1") == WorkerLoad(3, 5)


def test_tracker_loads_feed_the_policy():
    tracker = ActiveLoadTracker()
    kv = policy()
    candidates = ["w0", "w1"]
    first = kv.choose(candidates, 6, {}, tracker.loads())
    tracker.on_routed("r1", first.worker_id, 6, 6)
    second = kv.choose(candidates, 6, {}, tracker.loads())
    assert (first.worker_id, second.worker_id) == ("w0", "w1")
    assert second.cost == 6.0
