"""Building the planner's `Observation` from cumulative serving counters: pure arithmetic, no I/O.

The frontend keeps counts since it started (requests routed, prompt tokens, Prometheus latency
histograms). The planner wants one interval at a time, so the adapter reads a `ServingTotals` on
each tick and the observation is the difference of two readings:

- request rate: requests routed in the interval over its length; none routed gives None (the
  policy reads that as zero load, never as "hold");
- mean input tokens and prefix hit rate: prompt tokens routed, and the part of them cached on the
  chosen decode worker, per request;
- the prompt-length mix: requests and prompt tokens routed per length class (the router's classes
  by bit length), as (mean tokens, share of the requests) per class seen in the interval;
- mean output tokens: tokens streamed (one TTFT sample plus one ITL sample per streamed chunk,
  and a chunk carries one token unless a step outran the stream) per finished request;
- TTFT and ITL percentiles: from the histogram buckets' differences, interpolated linearly inside
  the bucket the quantile falls in (Prometheus' `histogram_quantile`); a quantile in the last,
  unbounded bucket is reported as that bucket's lower bound.

Each worker is one `WorkerView` (planner.observation), built by `worker_view` from what the
frontend's registry knows and what the adapter itself started, drains or flips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tandem.planner.observation import Observation, WorkerView

Buckets = tuple[tuple[float, float], ...]   # (upper bound in seconds, cumulative count), sorted


@dataclass(frozen=True, slots=True)
class ServingTotals:
    time_s: float
    num_requests: int = 0               # routed
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    num_finished: int = 0               # requests that ended
    # (length class, requests, prompt tokens), cumulative, per class the router has seen
    length_classes: tuple[tuple[int, int, int], ...] = ()
    ttft_buckets: Buckets = ()
    itl_buckets: Buckets = ()

    @property
    def num_streamed(self) -> float:
        """First tokens plus later chunks: the tokens streamed so far."""
        return _total(self.ttft_buckets) + _total(self.itl_buckets)


def observe_interval(prev: ServingTotals, now: ServingTotals,
                     workers: tuple[WorkerView, ...]) -> Observation:
    """The Observation of the interval between two readings."""
    interval_s = max(now.time_s - prev.time_s, 1e-6)
    num_requests = now.num_requests - prev.num_requests
    num_finished = now.num_finished - prev.num_finished
    ttft = bucket_deltas(prev.ttft_buckets, now.ttft_buckets)
    itl = bucket_deltas(prev.itl_buckets, now.itl_buckets)
    return Observation(
        time_s=now.time_s, interval_s=interval_s,
        request_rate_per_s=num_requests / interval_s if num_requests > 0 else None,
        mean_input_tokens=_ratio(now.num_prompt_tokens - prev.num_prompt_tokens, num_requests),
        mean_output_tokens=_ratio(now.num_streamed - prev.num_streamed, num_finished),
        prefix_hit_rate=_ratio(now.num_cached_prompt_tokens - prev.num_cached_prompt_tokens,
                               now.num_prompt_tokens - prev.num_prompt_tokens),
        input_tokens_mix=length_mix(prev.length_classes, now.length_classes),
        ttft_p50_ms=_ms(bucket_quantile(ttft, 0.5)), ttft_p90_ms=_ms(bucket_quantile(ttft, 0.9)),
        itl_p50_ms=_ms(bucket_quantile(itl, 0.5)), itl_p90_ms=_ms(bucket_quantile(itl, 0.9)),
        workers=workers)


def length_mix(prev: tuple[tuple[int, int, int], ...],
               now: tuple[tuple[int, int, int], ...]) -> tuple[tuple[float, float], ...]:
    """(mean prompt tokens, share of the requests) per length class routed between two readings."""
    before = {key: (requests, tokens) for key, requests, tokens in prev}
    deltas = []
    for key, requests, tokens in now:
        old_requests, old_tokens = before.get(key, (0, 0))
        if requests > old_requests:
            deltas.append((requests - old_requests, tokens - old_tokens))
    total = sum(requests for requests, _ in deltas)
    return tuple((tokens / requests, requests / total) for requests, tokens in deltas)


def bucket_deltas(prev: Buckets, now: Buckets) -> Buckets:
    """Per-bucket cumulative counts of the interval (a first reading counts from zero)."""
    before = dict(prev)
    return tuple((bound, count - before.get(bound, 0.0)) for bound, count in now)


def bucket_quantile(buckets: Buckets, q: float) -> float | None:
    """The q-quantile, in seconds, of a cumulative histogram; None when it holds no samples."""
    total = _total(buckets)
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def worker_view(worker_id: str, role: str, is_ready: bool, num_waiting: int = 0,
                num_running: int = 0, kv_usage: float = 0.0) -> WorkerView:
    return WorkerView(worker_id, role, is_ready, num_waiting, num_running,
                      min(max(kv_usage, 0.0), 1.0))


def _total(buckets: Buckets) -> float:
    return buckets[-1][1] if buckets else 0.0


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
