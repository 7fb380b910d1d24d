"""Pool sizing: the smallest pools that meet the SLO at a given load, by queueing arithmetic.

The online planner calls this every tick, so it is closed-form reasoning over a performance model
(planner.perf_model, seen here only through the `PerfModel` protocol), not a simulation. The
simulator is where a shape is checked in detail; this picks the shape quickly.

Load: request rate lambda (1/s), the prompt-length mix (`input_mix`: mean prompt tokens and share
of each of the router's length classes, each spread over its range by planner.length_classes; the
mean input length ISL alone when nothing finer is known), mean output length OSL, prefix hit rate
h. A request prefills tokens * (1 - h) new tokens over tokens * h cached.

Prefill pool of n workers (disaggregated): planner.prefill_queue, over the prompts the router sends
it (uncached part at least `remote_prefill_min_tokens`; the rest are prefilled on their decode
workers, so a workload of short prompts needs no prefill pool). Each prompt is prefilled in
chunks of the worker's step budget; the pool is an M/G/c queue over the mix's service times; it
keeps up when its utilization is within `max_utilization` and its bursts do not spill, and its
late share is the requests that waiting pushes past the TTFT bound. Prompts whose own prefill
already exceeds the bound are counted apart: no pool size helps them. The reported TTFT is the
mean (wait, prefill, and the KV pull that the second token waits for).

Decode pool of n workers. With ctx = ISL + OSL / 2 the mean context of a running sequence, one step
of a batch of b takes t(b) = decode_s(b, b * ctx). B* is the largest b <= max_batch_size with
t(b) <= itl_ms. A worker then emits at most B* / t(B*) tokens/s within the ITL, and the pool must
emit lambda * OSL:

    n >= lambda * OSL * t(B*) / (B* * max_utilization)

The ITL reported for n comes from Little's law: a worker runs b = (lambda * OSL / n) * t(b)
sequences at once (arrival rate of tokens times the time each takes), solved by fixed-point
iteration; b above max_batch_size means the pool cannot keep up. The ITL bound is a bound on each
request's worst gap, and a disaggregated request's first gap on its decode worker is the longest:
the wait for the step boundary that parks it, its KV pull (a pull starts at that boundary and
the request joins the batch at the first boundary after the pull ends; no step is queued ahead
while a request is parked, engine/lookahead.py), then its own step: (U + 1 + 1) * t for a pull
shorter than a step, else U * t + transfer_s + V * t + t, with U and V uniform on [0, 1] (the
pull ends at a random point of a step and waits out the rest; counting whole steps instead made
the late share a saw-tooth in t, and the decode pool jumped 1 -> 3 -> 2 workers over a small load
change in the planner's simulated hour). A handover lands with its clump-mates
(arrival_dispersion as in the prefill pool): t is the step of the mean batch plus
(dispersion - 1) / n sequences. Its late share is the requests whose first gap exceeds the bound.

One budget for both (planner.miss_budget): the unreachable requests and the two pools' late
shares add up, and the plan is the fewest workers whose sum is at most `1 - attainment`. When no
pair reaches that, each pool is sized on its own, as before the budget was shared: big enough
when its own late share is within `1 - attainment` (the decode pool also when one more worker
would take less than that off its late list: the rest are the longest prompts, whose pull alone
takes most of the bound), and the plan says it cannot meet the SLO.

Aggregated pool of n workers (role `both`). With S the mix's prefill time in chunks of
`chunk_tokens`, a worker spends P = lambda / n * E[S] of each second on prefill, and uses D = lambda / n * OSL * t(B*) / B* of its decode capacity (as in the decode pool:
a small batch is not busy, more sequences join its steps almost free); P + D <= max_utilization.
Prompts queue as in the prefill pool, for the time decode leaves: service times stretched by
1 / (1 - D), and the same TTFT tail bound. A prompt is prefilled in chunks of
`chunk_tokens` mixed into decode steps; when prefill takes more than a tenth of the time, more than
one gap in ten is a mixed step, so the ITL p90 is step_s(chunk, ..., b, b * ctx) instead of t(b).
This is why 2048-token chunks lost the ITL SLO on 2x H200 where 512-token chunks held it
(DESIGN.md).

Bounds: every pool stays within its (min, max); when the disaggregated pools together exceed the
GPU budget, workers are handed out one at a time to the pool furthest below its need, and the
plan is marked as not meeting the SLO. With `layout="auto"` both layouts are sized and the one with
fewer GPUs wins; a tie keeps the current layout, so the planner does not flip all workers over
nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol

from tandem.engine.config import EngineConfig
from tandem.planner.length_classes import spread_classes
from tandem.planner.miss_budget import MIN_GAIN_FRACTION, cheapest_pair
from tandem.planner.prefill_queue import (late_share, mean_wait_s, service_mix, spills,
                                          stretched, unreachable_share)
from tandem.router.routing import RoutingConfig

MAX_FIXED_POINT_ITERATIONS = 50
PREFILL_TAIL_FRACTION = 0.1  # p90: a tail quantile is set by what happens in more than 10% of gaps


class PerfModel(Protocol):
    block_size: int
    kv_bytes_per_token: int

    def prefill_s(self, num_new_tokens: int, num_cached_tokens: int = 0) -> float: ...

    def decode_s(self, batch_size: int, num_context_tokens: int) -> float: ...

    def step_s(self, num_prefill_tokens: int, num_prefill_cached_tokens: int,
               num_decode_seqs: int, num_decode_context_tokens: int) -> float: ...

    def transfer_s(self, num_bytes: int) -> float: ...


@dataclass(frozen=True, slots=True)
class Load:
    request_rate_per_s: float
    mean_input_tokens: float
    mean_output_tokens: float
    prefix_hit_rate: float = 0.0
    # (mean prompt tokens, share of the requests) per length class; empty: the mean alone
    input_mix: tuple[tuple[float, float], ...] = ()
    arrival_dispersion: float = 1.0    # variance / mean of arrivals per second; 1: Poisson
    # True: input_mix holds the router's classes (bit lengths), each spread over its range
    # (planner.length_classes); False: its entries are exact prompt lengths.
    mix_is_classes: bool = True

    @property
    def mix(self) -> tuple[tuple[float, float], ...]:
        """(prompt tokens, share) points the pools are sized over."""
        if not self.input_mix:
            return ((self.mean_input_tokens, 1.0),)
        return spread_classes(self.input_mix) if self.mix_is_classes else self.input_mix

    @property
    def num_new_tokens(self) -> int:
        return max(1, round(self.mean_input_tokens * (1.0 - self.prefix_hit_rate)))

    @property
    def num_cached_tokens(self) -> int:
        return max(0, round(self.mean_input_tokens) - self.num_new_tokens)

    @property
    def mean_context_tokens(self) -> float:
        return self.mean_input_tokens + self.mean_output_tokens / 2


@dataclass(frozen=True, slots=True)
class SizingTarget:
    ttft_ms: float
    itl_ms: float
    max_utilization: float = 0.8
    max_batch_size: int = 256          # the engine's max running sequences per worker
    chunk_tokens: int = 512            # aggregated workers' prefill chunk
    # A prefill worker's step budget: it prefills a prompt in chunks of this many tokens.
    prefill_chunk_tokens: int = field(
        default_factory=lambda: EngineConfig().max_num_batched_tokens)
    attainment: float = 0.99           # share of requests the TTFT and ITL bounds are sized for
    # The router's limit on prompts at one prefill worker; past it prompts spill to decode workers.
    max_prefill_queue: int = field(default_factory=lambda: RoutingConfig().max_prefill_queue)
    # The router prefills a prompt remotely only from this many uncached tokens; shorter ones
    # are prefilled on their decode worker and never load the prefill pool.
    remote_prefill_min_tokens: int = field(
        default_factory=lambda: RoutingConfig().remote_prefill_min_tokens)


@dataclass(frozen=True, slots=True)
class PoolEstimate:
    num_workers: int
    utilization: float                 # busy fraction per worker; inf when it cannot keep up
    ttft_ms: float                     # NaN for a decode pool
    itl_ms: float                      # NaN for a prefill pool
    meets_slo: bool                    # on its own: its late share within 1 - attainment
    unreachable_share: float = 0.0     # requests over the TTFT bound however many workers
    late_share: float = 0.0            # requests it makes miss the SLO that more workers could save
    keeps_up: bool = True              # within max_utilization (prefill: no spill; decode: ITL)


@dataclass(frozen=True, slots=True)
class PoolPlan:
    layout: str                        # "disagg" or "agg"
    num_prefill: int
    num_decode: int
    num_both: int
    meets_slo: bool
    note: str                          # what bound the plan, for the decision's reason

    @property
    def num_workers(self) -> int:
        return self.num_prefill + self.num_decode + self.num_both


def prefill_estimate(perf: PerfModel, load: Load, target: SizingTarget, n: int) -> PoolEstimate:
    mix = service_mix(perf, load.mix, load.prefix_hit_rate, target.prefill_chunk_tokens)
    rate, dispersion = load.request_rate_per_s, load.arrival_dispersion
    rho = rate * mix.mean_s / n
    wait_probability, wait_s = mean_wait_s(mix, rate, n, dispersion)
    ttft_s = wait_s + sum(p * f for p, f in zip(mix.shares, mix.floor_s))
    ttft_bound_s = target.ttft_ms / 1e3
    late = late_share(mix, wait_probability, wait_s, ttft_bound_s)
    keeps_up = (rho <= target.max_utilization
                and not spills(mix, rate, wait_s, n, target.max_prefill_queue, dispersion,
                               target.attainment))
    ok = keeps_up and late <= 1.0 - target.attainment
    return PoolEstimate(n, rho, 1e3 * ttft_s, math.nan, ok,
                        unreachable_share(mix, ttft_bound_s), late, keeps_up)


def decode_estimate(perf: PerfModel, load: Load, target: SizingTarget, n: int) -> PoolEstimate:
    best = _max_batch_within_itl(perf, load, target)
    step_s = _decode_step_s(perf, load, best)
    utilization = load.request_rate_per_s * load.mean_output_tokens * step_s / (best * n)
    batch = _little_batch(perf, load, target, n)
    if not batch:
        return PoolEstimate(n, utilization, math.nan, math.inf, False, keeps_up=False)
    itl_s = _decode_step_s(perf, load, batch)
    late, unreachable = _handoff_late(perf, load, target, batch, n)
    budget = 1.0 - target.attainment
    # Past the knee, the late are the longest prompts' pulls: a worker that takes less than the
    # budget off the late list is not worth it.
    if late > budget:
        following = _little_batch(perf, load, target, n + 1)
        late_after = (_handoff_late(perf, load, target, following, n + 1)[0] if following
                      else late)
        is_handoff_ok = late - late_after < budget
    else:
        is_handoff_ok = True
    keeps_up = utilization <= target.max_utilization and itl_s <= target.itl_ms / 1e3
    return PoolEstimate(n, utilization, math.nan, 1e3 * itl_s, keeps_up and is_handoff_ok,
                        unreachable, late, keeps_up)


def aggregated_estimate(perf: PerfModel, load: Load, target: SizingTarget,
                        n: int) -> PoolEstimate:
    rate = load.request_rate_per_s / n
    batch = _little_batch(perf, load, target, n)
    if not batch:
        return PoolEstimate(n, math.inf, math.inf, math.inf, False, keeps_up=False)
    mix = service_mix(perf, load.mix, load.prefix_hit_rate, target.chunk_tokens)
    decode_step_s = _decode_step_s(perf, load, batch)
    best = _max_batch_within_itl(perf, load, target)
    prefill_busy = rate * mix.mean_s
    decode_busy = rate * load.mean_output_tokens * _decode_step_s(perf, load, best) / best
    utilization = prefill_busy + decode_busy
    # Prefills queue for the time decode leaves free: their service stretched by 1 / (1 - D).
    slowed = stretched(mix, 1.0 / (1.0 - decode_busy)) if decode_busy < 1.0 else None
    wait_probability, wait_s = ((1.0, math.inf) if slowed is None
                                else mean_wait_s(slowed, load.request_rate_per_s, n))
    ttft_ms = 1e3 * (wait_s + sum(p * f for p, f in zip(mix.shares, mix.floor_s)))
    late = late_share(slowed or mix, wait_probability, wait_s, target.ttft_ms / 1e3)
    itl_s = decode_step_s
    if prefill_busy > PREFILL_TAIL_FRACTION:
        chunk = min(target.chunk_tokens, load.num_new_tokens)
        itl_s = perf.step_s(chunk, load.num_cached_tokens, batch,
                            round(batch * load.mean_context_tokens))
    ok = (utilization <= target.max_utilization and late <= 1.0 - target.attainment
          and 1e3 * itl_s <= target.itl_ms)
    return PoolEstimate(n, utilization, ttft_ms, 1e3 * itl_s, ok,
                        unreachable_share(mix, target.ttft_ms / 1e3))


def _handoff_late(perf: PerfModel, load: Load, target: SizingTarget, batch: int,
                  num_workers: int) -> tuple[float, float]:
    """(share late, share unreachable) of first gaps on the decode worker over the ITL bound.

    The gap is the wait for the step boundary that parks the request (uniform over one step), its
    KV pull up to the first boundary after it ends (`_late_handoff_share`), then its own step. A
    handover lands with its clump-mates: under clumped arrivals of index of dispersion
    D = E[X^2] / E[X], a request has D - 1 others in its clump on average, spread over the pool, so
    its steps carry b + (D - 1) / n sequences. A class whose pull and own step beside no one else
    already exceed the bound is unreachable: more workers do not help it. A class whose prefill
    alone passes the TTFT bound is left out: its requests miss the SLO whatever its first gap,
    and the prefill pool's unreachable share counts them already.
    """
    mix = service_mix(perf, load.mix, load.prefix_hit_rate, target.prefill_chunk_tokens)
    busy = batch + max(0.0, load.arrival_dispersion - 1.0) / num_workers
    step_s = _decode_step_s(perf, load, max(batch, round(busy)))
    alone_step_s = _decode_step_s(perf, load, 1)
    bound_s, ttft_bound_s = target.itl_ms / 1e3, target.ttft_ms / 1e3
    late = unreachable = 0.0
    for share, transfer_s, floor_s in zip(mix.shares, mix.transfer_s, mix.floor_s):
        if floor_s > ttft_bound_s:
            continue  # late on its first token however it is served: the prefill pool's count
        if max(transfer_s, alone_step_s) + alone_step_s > bound_s:
            unreachable += share
            continue
        late += share * _late_handoff_share(transfer_s, step_s, bound_s)
    return late, unreachable


def _late_handoff_share(transfer_s: float, step_s: float, bound_s: float) -> float:
    """P(first gap > bound): U steps to the parking boundary, the pull, then the request's own
    step. A pull shorter than a step ends at the next boundary; a longer one ends at a uniform
    point V within a step and waits out the rest of it. U, V uniform on [0, 1]."""
    if transfer_s <= step_s:
        slack = bound_s / step_s - 2            # U + 1 + 1 steps
        return min(1.0, max(0.0, 1.0 - slack))
    slack = (bound_s - transfer_s) / step_s - 1  # U + V + transfer / step + 1 steps
    if slack <= 0.0:
        return 1.0
    if slack >= 2.0:
        return 0.0
    return 1.0 - slack * slack / 2 if slack <= 1.0 else (2.0 - slack) ** 2 / 2


def remote_part(load: Load, target: SizingTarget) -> Load:
    """The load the prefill pool sees: the prompts whose uncached part reaches the router's
    remote-prefill threshold (none at all: a prefill pool can go down to its minimum)."""
    kept = tuple((tokens, share) for tokens, share in load.mix
                 if tokens * (1.0 - load.prefix_hit_rate) >= target.remote_prefill_min_tokens)
    share = sum(s for _, s in kept) / sum(s for _, s in load.mix)
    if share >= 1.0:
        return load
    if not kept:
        return replace(load, request_rate_per_s=0.0)
    mean_tokens = sum(t * s for t, s in kept) / sum(s for _, s in kept)
    return replace(load, request_rate_per_s=load.request_rate_per_s * share,
                   mean_input_tokens=mean_tokens, input_mix=kept, mix_is_classes=False)


def smallest_pool(estimate, perf: PerfModel, load: Load, target: SizingTarget,
                  bounds: tuple[int, int]) -> PoolEstimate:
    """The smallest n in bounds whose estimate meets the SLO.

    When no n does (one request alone is slower than the SLO, or the pool is capped), the smallest
    n within the utilization bound: more workers than that buy nothing but cost GPUs.
    """
    low, high = bounds
    if _no_pool_needed(load, bounds):
        return PoolEstimate(0, 0.0, math.nan, math.nan, True)
    first_within_utilization = None
    for n in range(max(low, 1), high + 1):
        result = estimate(perf, load, target, n)
        if result.meets_slo:
            return result
        if first_within_utilization is None and result.utilization <= target.max_utilization:
            first_within_utilization = result
    return first_within_utilization or result


def _no_pool_needed(load: Load, bounds: tuple[int, int]) -> bool:
    """The pool may have no worker (capped at zero, or nothing to serve and no minimum)."""
    low, high = bounds
    return high <= 0 or (low == 0 and load.request_rate_per_s <= 0)


def plan_pools(perf: PerfModel, load: Load, target: SizingTarget, layout: str,
               bounds: dict[str, tuple[int, int]], max_workers: int,
               current_layout: str = "disagg") -> PoolPlan:
    """Pools for `layout` ("disagg", "agg" or "auto"), within `bounds` and `max_workers`."""
    disagg = _plan_disagg(perf, load, target, bounds, max_workers) if layout != "agg" else None
    agg = _plan_agg(perf, load, target, bounds, max_workers) if layout != "disagg" else None
    if disagg is None or agg is None:
        return disagg or agg
    if disagg.meets_slo != agg.meets_slo:
        return disagg if disagg.meets_slo else agg
    if disagg.num_workers == agg.num_workers:
        return agg if current_layout == "agg" else disagg
    return disagg if disagg.num_workers < agg.num_workers else agg


def _plan_disagg(perf: PerfModel, load: Load, target: SizingTarget,
                 bounds: dict[str, tuple[int, int]], max_workers: int) -> PoolPlan:
    """The fewest workers whose misses add up within the budget (planner.miss_budget); when no
    pair does, each pool sized on its own budget, and the plan marked as missing the SLO."""
    remote = remote_part(load, target)
    remote_share = (remote.request_rate_per_s / load.request_rate_per_s
                    if load.request_rate_per_s > 0 else 0.0)
    prefills = _pool_options(prefill_estimate, perf, remote, target, bounds["prefill"])
    decodes = _pool_options(decode_estimate, perf, load, target, bounds["decode"])
    pair = None
    if prefills and decodes:
        unreachable = remote_share * prefills[0].unreachable_share + decodes[0].unreachable_share
        pair = cheapest_pair([(p.num_workers, remote_share * p.late_share) for p in prefills],
                             [(d.num_workers, d.late_share) for d in decodes],
                             1.0 - target.attainment - unreachable, max_workers)
    if pair is not None:
        prefill = next(p for p in prefills if p.num_workers == pair[0])
        decode = next(d for d in decodes if d.num_workers == pair[1])
    else:
        prefill = smallest_pool(prefill_estimate, perf, remote, target, bounds["prefill"])
        decode = smallest_pool(decode_estimate, perf, load, target, bounds["decode"])
    note = _disagg_note(prefill, decode, remote_share)
    if prefill.num_workers + decode.num_workers <= max_workers:
        return PoolPlan("disagg", prefill.num_workers, decode.num_workers, 0, pair is not None,
                        note)
    num_prefill, num_decode = _split_budget(prefill.num_workers, decode.num_workers,
                                            bounds, max_workers)
    note = (f"GPU budget of {max_workers} workers binds: prefill needs {prefill.num_workers}, "
            f"decode needs {decode.num_workers}")
    return PoolPlan("disagg", num_prefill, num_decode, 0, False, note)


def _pool_options(estimate, perf: PerfModel, load: Load, target: SizingTarget,
                  bounds: tuple[int, int]) -> list[PoolEstimate]:
    """The pool's estimates that keep up, from its smallest size while each added worker takes at
    least MIN_GAIN_FRACTION of the budget off the late list (planner.miss_budget)."""
    low, high = bounds
    if _no_pool_needed(load, bounds):
        return [PoolEstimate(0, 0.0, math.nan, math.nan, True)]
    min_gain = MIN_GAIN_FRACTION * (1.0 - target.attainment)
    options: list[PoolEstimate] = []
    for n in range(max(low, 1), high + 1):
        result = estimate(perf, load, target, n)
        if not result.keeps_up:
            continue
        if options and options[-1].late_share - result.late_share < min_gain:
            break
        options.append(result)
        if result.late_share <= 0.0:
            break
    return options


def _disagg_note(prefill: PoolEstimate, decode: PoolEstimate, remote_share: float) -> str:
    prefill_note = (f"prefill {prefill.num_workers} at {prefill.utilization:.0%} busy, "
                    f"TTFT ~{prefill.ttft_ms:.0f} ms" if not math.isnan(prefill.ttft_ms)
                    else f"prefill {prefill.num_workers} (no prompt long enough to send there)")
    note = f"{prefill_note}; decode {decode.num_workers}, ITL ~{decode.itl_ms:.1f} ms"
    note += (f"; misses ~{remote_share * prefill.late_share:.2%} waiting for prefill, "
             f"~{decode.late_share:.2%} on the hand-over")
    if prefill.unreachable_share > 0:
        note += (f"; {remote_share * prefill.unreachable_share:.1%} of prompts take longer than "
                 f"the TTFT bound to prefill alone")
    if decode.unreachable_share > 0:
        note += (f"; {decode.unreachable_share:.1%} of prompts take longer than the ITL bound "
                 f"to hand over")
    return note


def _plan_agg(perf: PerfModel, load: Load, target: SizingTarget,
              bounds: dict[str, tuple[int, int]], max_workers: int) -> PoolPlan:
    low, high = bounds["both"]
    both = smallest_pool(aggregated_estimate, perf, load, target, (low, min(high, max_workers)))
    note = (f"aggregated {both.num_workers} at {both.utilization:.0%} busy, "
            f"TTFT ~{both.ttft_ms:.0f} ms, ITL ~{both.itl_ms:.1f} ms")
    is_reachable = both.unreachable_share <= 1.0 - target.attainment
    return PoolPlan("agg", 0, 0, both.num_workers, both.meets_slo and is_reachable, note)


def _split_budget(need_prefill: int, need_decode: int, bounds: dict[str, tuple[int, int]],
                  max_workers: int) -> tuple[int, int]:
    """Hand out workers one at a time to the pool with the larger unmet share of its need."""
    num_prefill, num_decode = bounds["prefill"][0], bounds["decode"][0]
    while num_prefill + num_decode < max_workers:
        prefill_share = num_prefill / need_prefill if need_prefill else math.inf
        decode_share = num_decode / need_decode if need_decode else math.inf
        if prefill_share <= decode_share and num_prefill < need_prefill:
            num_prefill += 1
        elif num_decode < need_decode:
            num_decode += 1
        else:
            break
    return num_prefill, num_decode


def _decode_step_s(perf: PerfModel, load: Load, batch: int) -> float:
    return perf.decode_s(batch, round(batch * load.mean_context_tokens))


def _max_batch_within_itl(perf: PerfModel, load: Load, target: SizingTarget) -> int:
    """Largest batch whose decode step meets itl_ms (binary search: step time grows with b)."""
    itl_s = target.itl_ms / 1e3
    low, high = 1, target.max_batch_size
    if _decode_step_s(perf, load, high) <= itl_s:
        return high
    while low < high:
        mid = (low + high + 1) // 2
        if _decode_step_s(perf, load, mid) <= itl_s:
            low = mid
        else:
            high = mid - 1
    return low


def _little_batch(perf: PerfModel, load: Load, target: SizingTarget, n: int) -> int:
    """Running sequences per worker, b = (rate * OSL / n) * t(b); 0 if above max_batch_size."""
    tokens_per_s = load.request_rate_per_s * load.mean_output_tokens / n
    batch = 1
    for _ in range(MAX_FIXED_POINT_ITERATIONS):
        following = max(1, math.ceil(tokens_per_s * _decode_step_s(perf, load, batch)))
        if following > target.max_batch_size:
            return 0
        if following == batch:
            break
        batch = following
    return batch
