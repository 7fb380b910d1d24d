"""Length classes spread over their ranges, checked against numerical integration on a grid."""

from __future__ import annotations

import math

import pytest

from tandem.planner.length_classes import POINTS_PER_CLASS, spread_classes

NUM_CELLS = 20_000


def grid_slice_means(low: float, high: float, mean: float, num_slices: int) -> list[float]:
    """Slice means of the density proportional to exp(theta * x) on [low, high) with this mean,
    by brute force: theta found by bisection on the grid's own mean, slices cut where the grid's
    cumulative mass crosses j / num_slices."""
    width = (high - low) / NUM_CELLS
    xs = [low + (i + 0.5) * width for i in range(NUM_CELLS)]

    def weights(theta: float) -> list[float]:
        top = max(theta * (x - low) for x in (xs[0], xs[-1]))
        return [math.exp(theta * (x - low) - top) for x in xs]

    def grid_mean(theta: float) -> float:
        w = weights(theta)
        return sum(wi * x for wi, x in zip(w, xs)) / sum(w)

    lo, hi = -500.0 / (high - low), 500.0 / (high - low)
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if grid_mean(mid) < mean else (lo, mid)
    w = weights((lo + hi) / 2)
    total = sum(w)
    sums, masses, mass = [0.0] * num_slices, [0.0] * num_slices, 0.0
    for wi, x in zip(w, xs):
        j = min(num_slices - 1, int(mass / total * num_slices))
        sums[j] += wi * x
        masses[j] += wi
        mass += wi
    return [s / m for s, m in zip(sums, masses)]


def test_a_class_with_its_mean_in_the_middle_spreads_evenly():
    """Class 17 holds 65,536 to 131,071 tokens; a mean at the midpoint is the uniform density, so
    the points are the midpoints of eight equal slices."""
    points = spread_classes(((98304.0, 0.02),))
    assert [tokens for tokens, _ in points] == pytest.approx(
        [65536 + (j + 0.5) * 8192 for j in range(8)], rel=1e-9)
    assert [share for _, share in points] == pytest.approx([0.0025] * 8)


@pytest.mark.parametrize("mean", [70000.0, 88466.0, 120000.0])
def test_a_tilted_class_matches_the_integrated_density(mean):
    points = spread_classes(((mean, 1.0),))
    expected = grid_slice_means(65536.0, 131072.0, mean, POINTS_PER_CLASS)
    assert [tokens for tokens, _ in points] == pytest.approx(expected, rel=2e-4)
    assert sum(tokens * share for tokens, share in points) == pytest.approx(mean, rel=1e-9)


def test_the_conversation_traces_longest_class_reaches_past_the_mean():
    """Mean 88,466 tokens: the top eighth of the class averages 121k tokens, which an H200
    prefills in more than 10 s, while the class mean takes 7.2 s."""
    points = spread_classes(((917.0, 0.1125), (88466.0, 0.0211)))
    top_tokens, top_share = points[-1]
    assert top_tokens == pytest.approx(120951, rel=1e-4)
    assert top_share == pytest.approx(0.0211 / 8)
    assert sum(share for _, share in points) == pytest.approx(0.1336)


def test_entries_of_one_class_merge_by_share_and_a_mean_at_the_edge_stays_a_point():
    merged = spread_classes(((80000.0, 0.01), (100000.0, 0.03)))
    assert merged == spread_classes(((95000.0, 0.04),))
    # 1024 tokens opens class 11 (1,024 to 2,047): every prompt of that mean is 1,024 long.
    assert spread_classes(((1024.0, 0.5),)) == ((1024.0, 0.5),)
