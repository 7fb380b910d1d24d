"""One miss budget for both pools, against an exhaustive search over every pair of sizes."""

from __future__ import annotations

import random

from tandem.planner.miss_budget import cheapest_pair


def exhaustive(prefill, decode, budget, max_workers):
    fits = [(p + d, pl + dl, (p, d)) for p, pl in prefill for d, dl in decode
            if p + d <= max_workers and pl + dl <= budget]
    return min(fits)[2] if fits else None


def test_each_pool_within_the_budget_alone_is_not_enough_together():
    """Alone, 4 prefill (0.6% late) and 2 decode workers (0.4%) are each within a 1% budget; with
    0.48% of the requests unreachable, the 0.52% left takes 5 + 2 (0.51%). With 0.45% left,
    5 + 3 and 6 + 2 both fit in 8 workers, and 5 + 3 misses fewer."""
    prefill = [(4, 0.006), (5, 0.0011), (6, 0.0002)]
    decode = [(2, 0.004), (3, 0.0008), (4, 0.0)]
    assert cheapest_pair(prefill, decode, 0.01 - 0.0048, 16) == (5, 2)
    assert cheapest_pair(prefill, decode, 0.0045, 16) == (5, 3)
    assert cheapest_pair(prefill, decode, 0.0052, 6) is None      # the GPU budget binds
    assert cheapest_pair(prefill, decode, -0.001, 16) is None     # the unreachable alone overflow


def test_the_search_matches_an_exhaustive_one():
    rng = random.Random(7)
    for _ in range(500):
        prefill = _options(rng, rng.randint(1, 4))
        decode = _options(rng, rng.randint(1, 4))
        budget = rng.uniform(-0.002, 0.02)
        max_workers = rng.randint(2, 16)
        assert cheapest_pair(prefill, decode, budget, max_workers) == \
            exhaustive(prefill, decode, budget, max_workers)


def _options(rng: random.Random, first: int) -> list[tuple[int, float]]:
    """Sizes from `first` up, late shares falling with each worker (as queueing makes them)."""
    late, options = rng.uniform(0.0, 0.03), []
    for n in range(first, first + rng.randint(1, 6)):
        options.append((n, round(late, 5)))
        late *= rng.uniform(0.0, 0.9)
    return options
