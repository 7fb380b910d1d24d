"""The replay profile's accounting of overlapping kernels (benchmarks/profile_engine.py)."""

from __future__ import annotations

import pytest

from benchmarks.profile_engine import critical_times


def test_overlapping_kernels_are_charged_only_past_the_end_of_the_ones_before():
    # b starts under a's tail, c runs inside b, d starts after a gap
    kernels = [("a", 0.0, 10.0), ("b", 8.0, 15.0), ("c", 9.0, 12.0), ("d", 20.0, 24.0),
               ("a", 24.0, 26.0)]
    charged, calls, idle = critical_times(kernels)
    assert charged == pytest.approx({"a": 12.0, "b": 5.0, "c": 0.0, "d": 4.0})
    assert calls == {"a": 2, "b": 1, "c": 1, "d": 1}
    assert idle == pytest.approx(5.0)
    assert sum(charged.values()) + idle == pytest.approx(26.0)   # the timeline's span


def test_an_empty_timeline():
    assert critical_times([]) == ({}, {}, 0.0)
