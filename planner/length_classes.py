"""Prompt-length classes are ranges, not points: each class's prompts spread over its range.

The router counts the prompts it routes by the bit length of their token count (class b holds
2^(b-1) to 2^b - 1 tokens) and the planner sees one mean per class (`Load.input_mix`). Sizing
from the means alone misses what matters most at the top of the mix. On the conversation trace
the longest class (65,536 to 131,071 tokens, 2.1% of the requests) has a mean of 88k tokens, which
an H200 prefills in 7.2 s, inside a 10 s TTFT bound; but 23% of that class lies past 106k tokens,
whose prefill alone takes more than 10 s (0.48% of all requests, half the 1% that a 99%
attainment allows), and which hold a prefill worker 10 to 13 s each. The class means counted
none of them as unreachable, and the planner gave the whole 1% to waiting.

Model. Within a class of range [lo, hi) and mean m, prompt lengths follow the density of maximum
entropy on the range with that mean: f(x) proportional to exp(theta * x), uniform when m is the
midpoint and tilted towards the end m leans to (theta solved by bisection). Each class becomes
`POINTS_PER_CLASS` points of equal share, each the mean of its slice of the density, so the mix's
mean is kept exactly. On the trace this counts 0.39% of the requests as unreachable on average
over the planner's windows (0.26% over the hour's whole mix, whose top class is one slice past the
bound; truth: 0.48%): the trace's top class is flatter near its end than the density.
Several entries of one class (the mixes of several intervals) are merged first, by share.
"""

from __future__ import annotations

import math
from functools import lru_cache

POINTS_PER_CLASS = 8        # slices per class: the top slice of the longest class is its tail
MAX_TILT = 500.0            # |theta| on the unit range; past it the density is a point at one end
BISECTION_STEPS = 60


@lru_cache(maxsize=64)
def spread_classes(mix: tuple[tuple[float, float], ...],
                   points_per_class: int = POINTS_PER_CLASS) -> tuple[tuple[float, float], ...]:
    """(tokens, share) points spreading each (mean tokens, share) class of `mix` over its range."""
    classes: dict[int, list[float]] = {}
    for tokens, share in mix:
        if share <= 0:
            continue
        entry = classes.setdefault(max(0, int(tokens)).bit_length(), [0.0, 0.0])
        entry[0] += share
        entry[1] += share * tokens
    points = []
    for bits, (share, weighted) in sorted(classes.items()):
        mean = weighted / share
        if bits <= 1:  # 0 or 1 token: nothing to spread
            points.append((mean, share))
            continue
        low, high = 2.0 ** (bits - 1), 2.0 ** bits
        theta = _tilt_for_mean((mean - low) / (high - low))
        if theta is None:  # the mean at one end of the range: every prompt is there
            points.append((mean, share))
            continue
        for u in slice_means(theta, points_per_class):
            points.append((low + u * (high - low), share / points_per_class))
    return tuple(points)


def slice_means(theta: float, num_slices: int) -> list[float]:
    """Means of `num_slices` equal-probability slices of exp(theta * u) on [0, 1]."""
    edges = [_quantile(theta, j / num_slices) for j in range(num_slices + 1)]
    return [_slice_mean(theta, a, b) for a, b in zip(edges, edges[1:])]


def mean_of_tilt(theta: float) -> float:
    """Mean of the density proportional to exp(theta * u) on [0, 1]."""
    return _slice_mean(theta, 0.0, 1.0)


def _tilt_for_mean(mean: float) -> float | None:
    """The theta whose density has this mean on [0, 1]; None past MAX_TILT (a point mass)."""
    low, high = -MAX_TILT, MAX_TILT
    if not mean_of_tilt(low) < mean < mean_of_tilt(high):
        return None
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        if mean_of_tilt(mid) < mean:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _quantile(theta: float, q: float) -> float:
    if abs(theta) < 1e-9:
        return q
    if theta < 0:  # mirror: u -> 1 - u turns theta into -theta
        return 1.0 - _quantile(-theta, 1.0 - q)
    # log(1 + q (e^theta - 1)) / theta, written from the top end so that exp never overflows
    return 1.0 + math.log(q + (1.0 - q) * math.exp(-theta)) / theta


def _slice_mean(theta: float, a: float, b: float) -> float:
    """Mean of u on [a, b] under the density proportional to exp(theta * u)."""
    width = b - a
    if width <= 0:
        return a
    if abs(theta * width) < 1e-3:  # the tilt's first order: a uniform slice's variance times theta
        return (a + b) / 2 + theta * width * width / 12
    if theta < 0:  # mirror: u -> 1 - u turns theta into -theta
        return 1.0 - _slice_mean(-theta, 1.0 - b, 1.0 - a)
    # (b e^(theta b) - a e^(theta a)) / (e^(theta b) - e^(theta a)) - 1 / theta, over e^(theta b)
    return a + width / -math.expm1(-theta * width) - 1.0 / theta
