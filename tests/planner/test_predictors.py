"""Load predictors: NaN handling, the constant and moving-average baselines, trends, Holt-Winters."""

from __future__ import annotations

import math
import random

import pytest

from tandem.planner.config import PlannerConfig
from tandem.planner.predictors import (ConstantPredictor, DampedTrendPredictor,
                                       HoltWintersPredictor,
                                       LinearTrendPredictor, MovingAveragePredictor,
                                       make_predictor)

DAY_S = 86400.0


def test_constant_keeps_the_last_value_and_skips_missing():
    predictor = ConstantPredictor()
    assert predictor.predict(30) == 0.0
    predictor.observe(0, 5.0)
    predictor.observe(30, math.nan)
    predictor.observe(60, None)
    assert predictor.predict(30) == 5.0


def test_moving_average_over_its_window():
    predictor = MovingAveragePredictor(window=3)
    for t, value in enumerate([1.0, 2.0, math.nan, 3.0, 4.0]):
        predictor.observe(30 * t, value)
    assert predictor.predict(30) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="window"):
        MovingAveragePredictor(window=0)


def test_make_predictor_follows_the_config():
    assert isinstance(make_predictor(PlannerConfig()), ConstantPredictor)
    assert isinstance(make_predictor(PlannerConfig(predictor="moving_average")),
                      MovingAveragePredictor)
    assert isinstance(make_predictor(PlannerConfig(predictor="holt_winters")),
                      HoltWintersPredictor)
    assert isinstance(make_predictor(PlannerConfig(predictor="linear_trend")),
                      LinearTrendPredictor)


def test_linear_trend_reads_its_line_at_the_horizon():
    predictor = LinearTrendPredictor(window=3)
    assert predictor.predict(60) == 0.0
    predictor.observe(0, 9.0)
    assert predictor.predict(60) == 9.0                   # one point: no slope yet
    for t, value in [(60, 1.0), (120, 2.0), (180, math.nan), (240, 4.0)]:
        predictor.observe(t, value)
    # Points (60, 1), (120, 2), (240, 4): slope 1/60 per second through them exactly.
    assert predictor.predict(180) == pytest.approx(7.0)
    for t, value in [(300, 3.0), (360, 2.0)]:
        predictor.observe(t, value)
    assert predictor.predict(600) == 0.0                  # a falling line stops at zero load
    with pytest.raises(ValueError, match="window"):
        LinearTrendPredictor(window=1)


def _daily_rate(t: float) -> float:
    return 10.0 + 8.0 * math.sin(2 * math.pi * t / DAY_S)


def test_holt_winters_follows_a_daily_sinusoid_better_than_constant():
    pytest.importorskip("statsmodels")
    rng = random.Random(0)
    holt_winters, constant = HoltWintersPredictor(DAY_S), ConstantPredictor()
    errors_hw, errors_constant = [], []
    t = 0.0
    while t < 4 * DAY_S:
        value = _daily_rate(t) + rng.gauss(0, 0.5)
        holt_winters.observe(t, value)
        constant.observe(t, value)
        if t >= 3 * DAY_S and t % 7200 == 0:     # day four, every two hours, one hour ahead
            actual = _daily_rate(t + 3600)
            errors_hw.append(abs(holt_winters.predict(3600) - actual))
            errors_constant.append(abs(constant.predict(3600) - actual))
        t += 60.0
    mean_hw = sum(errors_hw) / len(errors_hw)
    mean_constant = sum(errors_constant) / len(errors_constant)
    assert mean_hw < 0.5
    assert mean_hw < mean_constant / 3


def test_holt_winters_before_a_full_season_and_with_gaps():
    pytest.importorskip("statsmodels")
    predictor = HoltWintersPredictor(DAY_S)
    predictor.observe(0, 4.0)
    assert predictor.predict(60) == 4.0        # too little history: the last value
    for step in range(1, 12 * 4):              # a rising trend, 15-minute buckets
        predictor.observe(step * 900.0, 4.0 + step * 0.1)
        predictor.observe(step * 900.0 + 60, math.nan)
    assert predictor.predict(900) > 8.0
    predictor.observe(DAY_S, 9.0)              # a gap of many buckets does not break the fit
    assert math.isfinite(predictor.predict(900))


def test_holt_winters_without_statsmodels_says_what_to_install(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "statsmodels.tsa.holtwinters", None)
    with pytest.raises(ValueError, match="statsmodels"):
        HoltWintersPredictor(DAY_S)


def test_damped_trend_reads_a_ramp_and_fades_its_slope():
    steady = DampedTrendPredictor(window=4)
    for t in range(0, 600, 60):
        steady.observe(t, 5.0)
    assert steady.predict(180) == pytest.approx(5.0)
    ramps = {damping: DampedTrendPredictor(window=4, damping=damping) for damping in (1.0, 0.5)}
    for t in range(0, 1860, 60):                            # one more request/s each interval
        for predictor in ramps.values():
            predictor.observe(t, 2.0 + t / 60)
            predictor.observe(t + 30, math.nan)              # skipped, not a zero
    last = 2.0 + 1800 / 60
    assert ramps[1.0].predict(180) == pytest.approx(last + 3.0, abs=0.01)
    # Damped by half per interval, the trend never catches the slope and the level lags the ramp:
    # the forecast three intervals ahead is below the last value, within two intervals of slope.
    assert last - 2.0 < ramps[0.5].predict(180) < last
    falling = DampedTrendPredictor(window=2, damping=1.0)
    for t, value in [(0, 4.0), (60, 2.0), (120, 0.5)]:
        falling.observe(t, value)
    assert falling.predict(600) == 0.0                       # stops at zero load
    assert DampedTrendPredictor(window=3).predict(60) == 0.0
    with pytest.raises(ValueError, match="window"):
        DampedTrendPredictor(window=0)
    with pytest.raises(ValueError, match="damping"):
        DampedTrendPredictor(window=3, damping=1.5)


def test_damped_trend_is_made_from_the_config():
    predictor = make_predictor(PlannerConfig(predictor="damped_trend", predictor_window=3,
                                             trend_damping=0.7))
    assert isinstance(predictor, DampedTrendPredictor)
    assert predictor.level_weight == pytest.approx(0.5) and predictor.damping == 0.7
    with pytest.raises(ValueError, match="trend_damping"):
        PlannerConfig(trend_damping=1.2)
    with pytest.raises(ValueError, match="shape_window"):
        PlannerConfig(shape_window=0)
