"""Arrival schedules and session order."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tandem.bench.arrivals import (arrival_offsets_s, gamma_arrival_offsets_s,
                                   session_predecessors)
from tandem.bench.records import BenchRequest


def _gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.asarray(offsets))


def test_poisson_mean_gap_is_one_over_rate():
    offsets = gamma_arrival_offsets_s(20_001, request_rate=50.0, burstiness=1.0, seed=0)
    gaps = _gaps(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean.
    assert gaps.std() == pytest.approx(1 / 50, rel=0.05)


def test_gamma_burstiness_keeps_mean_and_sets_variance():
    rate = 10.0
    for burstiness in (0.25, 4.0):
        gaps = _gaps(gamma_arrival_offsets_s(40_001, rate, burstiness, seed=1))
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.04)
        assert gaps.var() == pytest.approx(1 / (rate ** 2 * burstiness), rel=0.1)


def test_schedule_is_seeded():
    assert gamma_arrival_offsets_s(10, 5.0, 1.0, seed=3) == gamma_arrival_offsets_s(10, 5.0, 1.0, 3)
    assert gamma_arrival_offsets_s(10, 5.0, 1.0, seed=3) != gamma_arrival_offsets_s(10, 5.0, 1.0, 4)


def test_infinite_rate_sends_everything_at_once():
    assert gamma_arrival_offsets_s(4, math.inf, 1.0, seed=0) == [0.0] * 4


def test_recorded_offsets_win_over_the_rate():
    requests = [BenchRequest((20,), 1, arrival_offset_s=t) for t in (0.0, 0.5, 2.0)]
    assert arrival_offsets_s(requests, 1000.0, 1.0, seed=0) == [0.0, 0.5, 2.0]


@pytest.mark.parametrize("rate,burstiness", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_bad_rates_raise(rate, burstiness):
    with pytest.raises(ValueError):
        gamma_arrival_offsets_s(3, rate, burstiness, seed=0)


def test_session_predecessors_link_turns_in_turn_order():
    requests = [
        BenchRequest((20,), 1, session_id=0, turn_index=1),
        BenchRequest((20,), 1),
        BenchRequest((20,), 1, session_id=0, turn_index=0),
        BenchRequest((20,), 1, session_id=1, turn_index=0),
        BenchRequest((20,), 1, session_id=0, turn_index=2),
    ]
    assert session_predecessors(requests) == [2, None, None, None, 0]
