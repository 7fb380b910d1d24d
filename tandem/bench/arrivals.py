"""When each request is sent: arrival offsets and the session order between turns.

Arrivals follow a gamma process: gaps drawn from Gamma(shape=burstiness, scale=1/(rate*burstiness)),
so the mean gap is always 1/rate while the variance is 1/(rate^2 * burstiness). Burstiness 1 is a
Poisson process (exponential gaps); below 1 requests bunch up, above 1 they spread evenly. An
infinite rate sends everything at once, which with a concurrency cap is a fixed-concurrency run.
Datasets that carry their own arrival times (a trace) are replayed as recorded instead.

A turn of a session also waits for the previous turn of the same session to finish; that is a
runtime condition, so this module only says which request each one waits for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tandem.bench.records import BenchRequest


def gamma_arrival_offsets_s(num_requests: int, request_rate: float, burstiness: float,
                            seed: int) -> list[float]:
    """Send offsets from the start of the run; the first request goes at 0."""
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be positive (or inf), got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng([seed, 10])
    gaps_s = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness),
                       size=num_requests - 1)
    return [0.0, *np.cumsum(gaps_s).tolist()]


def arrival_offsets_s(requests: Sequence[BenchRequest], request_rate: float, burstiness: float,
                      seed: int) -> list[float]:
    """Recorded offsets when every request has one, otherwise a gamma schedule."""
    if requests and all(r.arrival_offset_s is not None for r in requests):
        return [float(r.arrival_offset_s) for r in requests]  # type: ignore[arg-type]
    return gamma_arrival_offsets_s(len(requests), request_rate, burstiness, seed)


def session_predecessors(requests: Sequence[BenchRequest]) -> list[int | None]:
    """For each request, the index of the previous turn of its session (None if it has none)."""
    last_turn: dict[int, int] = {}  # session id -> request index of its latest turn so far
    order = sorted(range(len(requests)),
                   key=lambda i: (requests[i].session_id or 0, requests[i].turn_index, i))
    predecessors: list[int | None] = [None] * len(requests)
    for index in order:
        request = requests[index]
        if request.session_id is None:
            continue
        predecessors[index] = last_turn.get(request.session_id)
        last_turn[request.session_id] = index
    return predecessors
