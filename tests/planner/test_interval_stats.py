"""Building the planner's Observation from two readings of the frontend's cumulative counters."""

from __future__ import annotations

import math

import pytest

from tandem.planner.interval_stats import (ServingTotals, bucket_deltas, bucket_quantile,
                                           observe_interval, worker_view)

INF = math.inf


def test_quantile_interpolates_inside_the_bucket():
    # 10 samples: 2 up to 10 ms, 8 more up to 20 ms, none above.
    buckets = ((0.01, 2.0), (0.02, 10.0), (INF, 10.0))
    assert bucket_quantile(buckets, 0.5) == pytest.approx(0.01 + 0.01 * 3 / 8)
    assert bucket_quantile(buckets, 0.9) == pytest.approx(0.01 + 0.01 * 7 / 8)
    assert bucket_quantile(buckets, 0.1) == pytest.approx(0.005)


def test_quantile_in_the_open_bucket_is_its_lower_bound_and_empty_is_none():
    assert bucket_quantile(((0.01, 1.0), (INF, 10.0)), 0.9) == 0.01
    assert bucket_quantile(((0.01, 0.0), (INF, 0.0)), 0.5) is None
    assert bucket_quantile((), 0.5) is None


def test_deltas_count_only_the_interval():
    prev = ((0.01, 5.0), (INF, 6.0))
    now = ((0.01, 5.0), (INF, 16.0))
    assert bucket_deltas(prev, now) == ((0.01, 0.0), (INF, 10.0))
    assert bucket_deltas((), now) == now


def test_observation_of_one_interval():
    prev = ServingTotals(time_s=10.0, num_requests=4, num_prompt_tokens=400,
                         num_cached_prompt_tokens=0, num_finished=3,
                         ttft_buckets=((0.1, 3.0), (INF, 4.0)),
                         itl_buckets=((0.01, 30.0), (INF, 30.0)))
    now = ServingTotals(time_s=12.0, num_requests=8, num_prompt_tokens=1200,
                        num_cached_prompt_tokens=200, num_finished=7,
                        ttft_buckets=((0.1, 7.0), (INF, 8.0)),
                        itl_buckets=((0.01, 66.0), (INF, 70.0)))
    workers = (worker_view("decode-0", "decode", True, 1, 3, 0.25),)
    obs = observe_interval(prev, now, workers)
    assert obs.interval_s == 2.0 and obs.time_s == 12.0
    assert obs.request_rate_per_s == 2.0
    assert obs.mean_input_tokens == 200.0
    assert obs.prefix_hit_rate == 0.25
    assert obs.mean_output_tokens == (4 + 40) / 4  # first tokens plus later chunks, per finished
    assert obs.ttft_p50_ms == pytest.approx(50.0)   # 4 samples, all in the first bucket
    assert obs.itl_p90_ms == pytest.approx(10.0)    # 36 of 40 in the 10 ms bucket
    assert obs.workers[0].num_requests == 4


def test_an_idle_interval_has_no_rate_and_no_latencies():
    totals = ServingTotals(time_s=5.0, num_requests=3, num_prompt_tokens=30, num_finished=3,
                           ttft_buckets=((INF, 3.0),))
    obs = observe_interval(totals, ServingTotals(**{**_fields(totals), "time_s": 6.0}), ())
    assert obs.request_rate_per_s is None
    assert obs.mean_input_tokens is None and obs.mean_output_tokens is None
    assert obs.ttft_p90_ms is None and obs.itl_p50_ms is None


def test_worker_view_clamps_a_usage_rounded_past_one():
    assert worker_view("w", "prefill", False, kv_usage=1.0000001).kv_usage == 1.0


def _fields(totals: ServingTotals) -> dict:
    return {name: getattr(totals, name) for name in ServingTotals.__slots__}


def test_the_prompt_length_mix_covers_only_the_interval():
    # Before: 3 short prompts (class 7: 64-127 tokens). In the interval: 1 more short one and
    # 3 long ones (class 14: 8192-16383 tokens).
    prev = ServingTotals(time_s=0.0, num_requests=3, length_classes=((7, 3, 300),))
    now = ServingTotals(time_s=1.0, num_requests=7,
                        length_classes=((7, 4, 380), (14, 3, 30000)))
    obs = observe_interval(prev, now, ())
    assert obs.input_tokens_mix == ((80.0, 0.25), (10000.0, 0.75))
    assert observe_interval(now, now, ()).input_tokens_mix == ()
