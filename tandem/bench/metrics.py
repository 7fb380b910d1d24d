"""Aggregating request records into a run summary; no I/O.

Definitions (the summary's JSON keys):
- `ttft_ms`, `tpot_ms`, `e2e_ms`: p50/p90/p99/mean over successful requests (TPOT skips requests
  with fewer than two output tokens), plus any other percentile asked for (`--percentiles
  50,90,99,99.9` adds `p99.9`; p50/p90/p99 are always there, so saved runs stay comparable). `itl_ms` pools every inter-chunk gap of every successful
  request. Percentiles interpolate linearly between order statistics (numpy's default).
  A metric with no samples has null statistics.
- `duration_s`: the run's wall time, from the first scheduled send to the last response.
- `request_throughput`: successful requests per second of `duration_s`;
  `input_token_throughput` and `output_token_throughput`: their prompt and output tokens per
  second (prompt tokens as the server counted them); `total_input_tokens`,
  `total_output_tokens`: the sums behind those rates.
- `goodput`: successful requests per second that meet every given SLO. The ITL bound applies to
  every gap of the request (its worst gap), so one stall fails the request, the way a user
  watching the stream would judge it. With no SLO given every successful request is good, and
  goodput equals request throughput.
- `prefix_hit_rate`: cached prompt tokens over prompt tokens, as the server reported them.
- `ideal_prefix_hit_rate`: what an infinite shared prefix cache would reach on the same request
  sequence (full blocks only, see `ideal_prefix_hit_rate`).
- `num_requests`: requests sent; `num_errors`: those that failed.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from tandem.bench.records import BenchRequest, RequestRecord
from tandem.contracts.block_hash import hash_prompt_blocks

SLO_METRICS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms")
LATENCY_KEYS = SLO_METRICS
# Always reported: `--compare` and the planner's simulator read these keys from every summary.
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True)
class LatencyStats:
    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None
    extra: dict[str, float | None] = field(default_factory=dict)  # "p99.9" -> value

    def to_json_dict(self) -> dict:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "mean": self.mean,
                **self.extra}


@dataclass(frozen=True)
class Summary:
    ttft_ms: LatencyStats
    itl_ms: LatencyStats
    tpot_ms: LatencyStats
    e2e_ms: LatencyStats
    request_throughput: float       # successful requests/s
    output_token_throughput: float  # output tokens/s
    goodput: float                  # requests/s meeting every SLO
    prefix_hit_rate: float
    ideal_prefix_hit_rate: float | None
    num_requests: int
    num_errors: int
    duration_s: float = 0.0
    input_token_throughput: float = 0.0  # prompt tokens/s
    total_input_tokens: int = 0
    total_output_tokens: int = 0

    def to_json_dict(self) -> dict:
        document = asdict(self)
        for key in LATENCY_KEYS:
            document[key] = getattr(self, key).to_json_dict()
        return document


def percentile_key(q: float) -> str:
    """The JSON key of percentile q: 50 -> "p50", 99.9 -> "p99.9"."""
    return f"p{q:g}"


def parse_percentiles(text: str) -> tuple[float, ...]:
    """`"50,90,99,99.9"` -> (50.0, 90.0, 99.0, 99.9); each must lie in [0, 100]."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(
                f"--percentiles takes numbers separated by commas, got {text!r}") from None
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"--percentiles: {item} is not in [0, 100]")
        values.append(value)
    return tuple(dict.fromkeys(values))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between the two order statistics around rank q/100 * (n - 1)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = q / 100.0 * (len(sorted_values) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def latency_stats(values: Iterable[float],
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> LatencyStats:
    """p50/p90/p99/mean, and each other percentile in `percentiles` under its own key."""
    ordered = sorted(values)
    extra_qs = [q for q in percentiles if q not in DEFAULT_PERCENTILES]
    if not ordered:
        return LatencyStats(None, None, None, None, {percentile_key(q): None for q in extra_qs})
    return LatencyStats(p50=percentile(ordered, 50), p90=percentile(ordered, 90),
                        p99=percentile(ordered, 99), mean=sum(ordered) / len(ordered),
                        extra={percentile_key(q): percentile(ordered, q) for q in extra_qs})


def parse_slo(items: Sequence[str]) -> dict[str, float]:
    """`["ttft_ms=500", "itl_ms=50"]` -> {"ttft_ms": 500.0, "itl_ms": 50.0}."""
    slo: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--slo takes NAME=MS with NAME in {', '.join(SLO_METRICS)}, "
                             f"got {item!r}")
        try:
            slo[name] = float(value)
        except ValueError as err:
            raise ValueError(f"--slo {name}: {value!r} is not a number") from err
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    if not record.is_ok:
        return False
    observed = {
        "ttft_ms": record.ttft_ms,
        "itl_ms": max(record.itl_ms) if record.itl_ms else None,
        "tpot_ms": record.tpot_ms,
        "e2e_ms": record.e2e_ms,
    }
    # A metric the request has no sample of (no second token) cannot violate its bound.
    return all(observed[name] is None or observed[name] <= bound for name, bound in slo.items())


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: dict[str, float],
              ideal_prefix_hit_rate: float | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Summary:
    ok = [r for r in records if r.is_ok]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per_second = 1.0 / duration_s if duration_s > 0 else 0.0
    return Summary(
        ttft_ms=latency_stats((r.ttft_ms for r in ok if r.ttft_ms is not None), percentiles),
        itl_ms=latency_stats((gap for r in ok for gap in r.itl_ms), percentiles),
        tpot_ms=latency_stats((r.tpot_ms for r in ok if r.tpot_ms is not None), percentiles),
        e2e_ms=latency_stats((r.e2e_ms for r in ok), percentiles),
        request_throughput=len(ok) * per_second,
        output_token_throughput=output_tokens * per_second,
        goodput=sum(meets_slo(r, slo) for r in ok) * per_second,
        prefix_hit_rate=(sum(r.cached_tokens for r in ok) / prompt_tokens
                         if prompt_tokens else 0.0),
        ideal_prefix_hit_rate=ideal_prefix_hit_rate,
        num_requests=len(records),
        num_errors=len(records) - len(ok),
        duration_s=duration_s,
        input_token_throughput=prompt_tokens * per_second,
        total_input_tokens=prompt_tokens,
        total_output_tokens=output_tokens,
    )


def ideal_prefix_hit_rate(requests: Sequence[BenchRequest], block_size: int) -> float:
    """Prefix hit rate of an infinite cache shared by all servers, over `requests` in order.

    Each prompt's leading full blocks whose chained hash was seen in an earlier prompt count as
    hits; partial last blocks are never cached (DESIGN.md, "Block hashes"). Real engines may also
    recompute the last cached block so that one token is left to prefill; this bound does not.
    """
    return ideal_prefix_hit_rate_of_hashes(
        ((hash_prompt_blocks(request.prompt_token_ids, block_size), request.prompt_len)
         for request in requests), block_size)


def ideal_prefix_hit_rate_of_hashes(prompts: Iterable[tuple[Sequence[int], int]],
                                    block_size: int) -> float:
    """`ideal_prefix_hit_rate` over (block hashes, prompt length) pairs already hashed, in order
    (the simulator hashes every prompt once to route it)."""
    seen: set[int] = set()
    hit_tokens = 0
    total_tokens = 0
    for hashes, prompt_len in prompts:
        # Chained hashes: once one block misses, no later block of this prompt can hit, and
        # `seen` holds whole prefixes, so the hits are a leading run found by bisection.
        hit_blocks = bisect_left(range(len(hashes)), True, key=lambda k: hashes[k] not in seen)
        seen.update(hashes[hit_blocks:])  # the hits are in `seen` already
        hit_tokens += hit_blocks * block_size
        total_tokens += prompt_len
    return hit_tokens / total_tokens if total_tokens else 0.0
