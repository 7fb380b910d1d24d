"""The order in which `tandem profile` visits its grid, and how repeats become one figure.

An eager step (prefill, mixed) is bound by the host launching kernels, and on a shared host that
cost drifts between regimes for seconds at a time: two H200 profiles of the same model showed runs
of consecutive points at twice the time of their neighbours. Repeating each point back to back
puts the whole point inside one regime. So prefill and mixed points are measured in passes: each
pass visits every point once, in a fresh random order, and a point's figure is the median over
passes, which spreads every regime over many points instead of a few.

Decode steps replay CUDA graphs and barely drift; their state (up to a million placed context
tokens) is expensive to build, so each decode point is built once and stepped repeatedly.
Mixed points are grouped by their decode batch, which is built once per group and pass; timed
as served (`tandem profile --mixed-as-served`), each is a short series of a long prompt's chunks
beside its decode batch (`StepProbe.mixed_series`), placed afresh each pass.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections import defaultdict

from tandem.planner.profile_grid import Repeats
from tandem.planner.profile_points import StepProbe

logger = logging.getLogger(__name__)


class PassClock:
    """How many passes a kind gets: warm-up ones, then min_timed, then more within budget_s."""

    def __init__(self, repeats: Repeats):
        self.repeats = repeats
        self.num_passes = 0
        self.timed_s = 0.0

    def passes(self):
        r = self.repeats
        while True:
            timed = self.num_passes - r.warmup
            if timed >= r.max_timed or (timed >= r.min_timed and self.timed_s >= r.budget_s):
                return
            start = time.perf_counter()
            yield self.num_passes >= r.warmup  # True: this pass is timed
            if self.num_passes >= r.warmup:
                self.timed_s += time.perf_counter() - start
            self.num_passes += 1


def sweep_prefill(probe: StepProbe, points: list[tuple[int, int]], repeats: Repeats,
                  rng: random.Random, tick) -> list[dict]:
    times: dict[tuple[int, int], list[float]] = defaultdict(list)
    for timed in PassClock(repeats).passes():
        for new, cached in rng.sample(points, len(points)):
            seconds = probe.prefill_once(new, cached)
            if timed:
                times[(new, cached)].append(seconds)
            tick()
    return [{"num_new_tokens": new, "num_cached_tokens": cached,
             "seconds": statistics.median(times[(new, cached)]),
             "num_repeats": len(times[(new, cached)])} for new, cached in points]


def sweep_mixed(probe: StepProbe, points: list[tuple[int, int, int, int]], repeats: Repeats,
                rng: random.Random, tick, as_served: bool = False) -> list[dict]:
    """Each point one step timed alone, or with `as_served` a short series of steps run as
    serving runs them (`StepProbe.mixed_series`), whose figures are the steps' own: the prompt's
    cached prefix grows along the series."""
    if as_served:
        return _sweep_mixed_series(probe, points, repeats, rng, tick)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for new, cached, batch, context in points:
        groups[(batch, context)].append((new, cached))
    times: dict[tuple, list[float]] = defaultdict(list)
    shapes: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for timed in PassClock(repeats).passes():
        for batch, context in rng.sample(list(groups), len(groups)):
            decodes = probe.place_decodes(batch, context)
            chunks = groups[(batch, context)]
            for new, cached in rng.sample(chunks, len(chunks)):
                seconds, num_context = probe.mixed_once(new, cached, decodes)
                if timed:
                    times[(new, cached, batch, context)].append(seconds)
                    shapes[(new, cached, batch, context)].append((cached, num_context))
                tick()
            probe.clear()
    return _mixed_rows(points, times, shapes)


def _sweep_mixed_series(probe: StepProbe, points: list[tuple[int, int, int, int]],
                        repeats: Repeats, rng: random.Random, tick) -> list[dict]:
    times: dict[tuple, list[float]] = defaultdict(list)
    shapes: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for timed in PassClock(repeats).passes():
        for point in rng.sample(points, len(points)):
            new, cached, batch, context = point
            seconds, num_cached, num_context = probe.mixed_series(new, cached, batch, context)
            if timed:
                times[point].append(seconds)
                shapes[point].append((num_cached, num_context))
            tick()
    return _mixed_rows(points, times, shapes)


def _mixed_rows(points: list[tuple[int, int, int, int]], times: dict[tuple, list[float]],
                shapes: dict[tuple, list[tuple[int, int]]]) -> list[dict]:
    """One row a point: its median time, and the cached prefix and decode context its steps had
    (mean over the repeats: placement rounds them to blocks, a series grows the prefix)."""
    return [{"num_prefill_tokens": p[0],
             "num_prefill_cached_tokens": round(statistics.mean(c for c, _ in shapes[p])),
             "num_decode_seqs": p[2],
             "num_decode_context_tokens": round(statistics.mean(k for _, k in shapes[p])),
             "seconds": statistics.median(times[p]), "num_repeats": len(times[p])}
            for p in points]


def sweep_decode(probe: StepProbe, points: list[tuple[int, int]], repeats: Repeats,
                 tick) -> list[dict]:
    results = []
    for batch, context in points:
        results.append(probe.decode(batch, context, repeats))
        tick()
    return results
