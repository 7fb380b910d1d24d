"""The prefill pool as a queue: service times over the prompt-length mix, the wait, the share of
requests that waiting pushes past the TTFT bound, and the bursts that spill onto decode workers.

Why not the mean prompt. Prefill time is convex in the prompt's length (attention over the prefix
grows with it), and a prefill worker runs a prompt in chunks of its step budget, each over a longer
cached prefix than the last. On the conversation trace (mean 12,035 prompt tokens, p99 85k) with
the H200 llama-3.1-8b profile, one prefill of the mean prompt takes 0.355 s, while the mean over the
trace's prompts, chunked at 2,048 tokens as the worker runs them, is 0.587 s; the squared
coefficient of variation of those times is 5.4. Sizing from the mean prompt asked for about half
the prefill workers the simulator needed (benchmarks/RESULTS.md).

Model. Requests come in length classes (`Load.input_mix`: mean prompt tokens and share of the
requests); each class prefills `tokens * (1 - hit rate)` new tokens over `tokens * hit rate` cached
ones, chunk by chunk (`chunked_prefill_s`), and its KV then moves to the decode worker. The router
sends a prompt to the prefill worker with the least outstanding work (KV overlap aside), which is a
G/G/c queue with one shared line; its mean wait is the Allen-Cunneen approximation, Erlang C's
M/M/c wait scaled by (ca^2 + cv^2) / 2. The arrivals' variability ca^2 is the index of dispersion
of arrivals per second (`Load.arrival_dispersion`): 1 for Poisson arrivals, about the batch size
for requests that come in batches (the conversation trace sends clumps of ten every few seconds).
A request waits at all with Erlang C's probability C, and then for an exponential time of mean
Wq / C, so a class whose own prefill and transfer take f seconds misses a TTFT bound T with
probability C * exp(-(T - f) * C / Wq). A class with f >= T misses it on an idle pool: no number of
workers helps it, so `late_share` leaves it out, and `unreachable_share` counts it; both go into
the miss budget the two pools share (planner.miss_budget).

Spill. The router gives a prefill worker at most `max_prefill_queue` prompts at once; when every
worker has that many, a prompt is prefilled on its decode worker, in chunks mixed into the decode
steps of everything running there, which breaks their inter-token bound. Requests in the prefill
pool number L = lambda * (Wq + E[S]) on average (Little), with variance dispersion * L; the pool
is sized so that L + z * sqrt(dispersion * L), z the normal quantile of `attainment`, fits in its
c * max_prefill_queue places.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from statistics import NormalDist

MAX_CHUNKS = 4096  # a prompt of more chunks than this is timed by its first MAX_CHUNKS


@dataclass(frozen=True, slots=True)
class ServiceMix:
    """Prefill service per length class, and its moments over the mix."""
    floor_s: tuple[float, ...]      # per class: prefill + KV transfer, the TTFT of an idle pool
    transfer_s: tuple[float, ...]   # per class: the KV pull to the decode worker
    shares: tuple[float, ...]       # per class: share of the requests, summing to 1
    mean_s: float                   # E[S], prefill alone: what occupies a worker
    cv2: float                      # squared coefficient of variation of S


def chunked_prefill_s(perf, num_new_tokens: int, num_cached_tokens: int,
                      chunk_tokens: int) -> float:
    """One prompt prefilled alone in chunks of `chunk_tokens`, each over the prefix before it."""
    total_s, done, end = 0.0, num_cached_tokens, num_cached_tokens + max(num_new_tokens, 1)
    for _ in range(MAX_CHUNKS):
        if done >= end:
            break
        chunk = min(chunk_tokens, end - done)
        total_s += perf.prefill_s(chunk, done)
        done += chunk
    return total_s


@lru_cache(maxsize=256)
def service_mix(perf, input_mix: tuple[tuple[float, float], ...], prefix_hit_rate: float,
                chunk_tokens: int) -> ServiceMix:
    """Service times of each class of `input_mix` ((prompt tokens, share) pairs)."""
    services, transfers, shares = [], [], []
    total_share = sum(share for _, share in input_mix)
    for tokens, share in input_mix:
        new = max(1, round(tokens * (1.0 - prefix_hit_rate)))
        cached = max(0, round(tokens) - new)
        services.append(chunked_prefill_s(perf, new, cached, chunk_tokens))
        num_blocks = math.ceil(tokens / perf.block_size)
        transfers.append(perf.transfer_s(num_blocks * perf.block_size * perf.kv_bytes_per_token))
        shares.append(share / total_share)
    mean_s = sum(p * s for p, s in zip(shares, services))
    second = sum(p * s * s for p, s in zip(shares, services))
    cv2 = max(second / (mean_s * mean_s) - 1.0, 0.0) if mean_s > 0 else 0.0
    floors = tuple(s + t for s, t in zip(services, transfers))
    return ServiceMix(floors, tuple(transfers), tuple(shares), mean_s, cv2)


def stretched(mix: ServiceMix, factor: float) -> ServiceMix:
    """The same mix on a worker that runs prefill only 1 / factor of the time."""
    return replace(mix, floor_s=tuple(f * factor for f in mix.floor_s),
                   mean_s=mix.mean_s * factor)


def erlang_c(num_servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (offered load a = lambda * E[S])."""
    if offered_load <= 0:
        return 0.0
    if offered_load >= num_servers:
        return 1.0
    erlang_b = 1.0
    for k in range(1, num_servers + 1):  # the stable recurrence for Erlang B
        erlang_b = offered_load * erlang_b / (k + offered_load * erlang_b)
    return num_servers * erlang_b / (num_servers - offered_load * (1.0 - erlang_b))


def mean_wait_s(mix: ServiceMix, rate_per_s: float, num_servers: int,
                arrival_dispersion: float = 1.0) -> tuple[float, float]:
    """(probability of waiting, mean wait Wq) of the G/G/c queue; (1, inf) when unstable."""
    offered = rate_per_s * mix.mean_s
    if offered >= num_servers:
        return 1.0, math.inf
    wait_probability = erlang_c(num_servers, offered)
    mmc_wait_s = wait_probability * mix.mean_s / (num_servers - offered)
    return wait_probability, mmc_wait_s * (arrival_dispersion + mix.cv2) / 2.0


def late_share(mix: ServiceMix, wait_probability: float, wait_s: float,
               ttft_s: float) -> float:
    """Share of all requests that would meet `ttft_s` on an idle pool but miss it by waiting."""
    if wait_probability <= 0 or wait_s <= 0:
        return 0.0
    if math.isinf(wait_s):
        return sum(p for p, f in zip(mix.shares, mix.floor_s) if f < ttft_s)
    decay = wait_probability / wait_s
    return sum(p * wait_probability * math.exp(-(ttft_s - f) * decay)
               for p, f in zip(mix.shares, mix.floor_s) if f < ttft_s)


def unreachable_share(mix: ServiceMix, ttft_s: float) -> float:
    """Share of requests whose own prefill and transfer already exceed `ttft_s`."""
    return sum(p for p, f in zip(mix.shares, mix.floor_s) if f >= ttft_s)


def spills(mix: ServiceMix, rate_per_s: float, wait_s: float, num_servers: int,
           max_queue: int, arrival_dispersion: float, attainment: float) -> bool:
    """Whether the pool's requests in flight overflow its places more often than allowed."""
    if math.isinf(wait_s):
        return True
    in_flight = rate_per_s * (wait_s + mix.mean_s)
    z = NormalDist().inv_cdf(attainment) if 0.0 < attainment < 1.0 else 0.0
    return in_flight + z * math.sqrt(arrival_dispersion * in_flight) > num_servers * max_queue
