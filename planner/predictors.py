"""Load prediction for the online planner: what will the request rate be one interval from now?

Every predictor has the same two calls: `observe(time_s, value)` once per tick and
`predict(horizon_s) -> float`. A NaN or None value is skipped, so an interval without data never
poisons the state; the planner itself turns a missing request rate into 0 (no requests arrived),
because a rate that is unknown at zero traffic is how a planner gets stuck above its minimum.

- `ConstantPredictor`: the last value. Reacts within one interval and never overshoots; the
  default, and what the other two fall back to while their history is short.
- `MovingAveragePredictor(window)`: the mean of the last `window` values; smooths noisy windows at
  the cost of lagging a step by `window` intervals.
- `LinearTrendPredictor(window)`: a least-squares line through the last `window` values, read at
  the horizon; follows a ramp (the planner asks for workers a start-up ahead of the load) at the
  cost of extrapolating noise, which is why the planner sizes for max(current, predicted) and
  scales down only after its hold period.
- `DampedTrendPredictor(window, damping)`: Holt's linear smoothing with a damped trend. The level
  and the trend are exponential averages spanning about `window` values, and the trend fades by
  `damping` per interval ahead, so a forecast a cold start out carries a fading slope instead of
  extending a line fitted through a few noisy points. On an exact ramp with `damping` 1 it reads
  the line; with less, it lags a sustained ramp (the trend never reaches the slope); a step moves it by a share of the step per interval (the planner's max with the
  current rate still meets a step at once). The default of `benchmarks/planner_sim_bench.py`;
  what it bought there, and what it did not, is in benchmarks/RESULTS.md.
- `HoltWintersPredictor(season_s)`: additive Holt-Winters (damped trend plus a seasonal cycle,
  statsmodels' `ExponentialSmoothing`), for daily swings. Samples are averaged into buckets of
  `season_s / buckets_per_season` (15 minutes for a day), which keeps a fit small and cheap; the
  planner sizes for max(current rate, prediction), so a step inside one bucket is still met on the
  next tick. The smoothing weights are re-optimised every `refit_s` (a quarter season, about
  0.15 s); between refits one fixed-weight pass (a few ms) folds in the buckets closed since. With
  fewer than two seasons of history it fits the damped trend alone, and with fewer than four
  buckets it returns the last value.

statsmodels is imported inside `HoltWintersPredictor` only: GPU hosts may not have it, and choosing
this predictor there fails with a ValueError that says what to install.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque
from typing import Any, Protocol

from tandem.planner.config import PlannerConfig
from tandem.planner.observation import is_missing

logger = logging.getLogger(__name__)

MIN_TREND_BUCKETS = 4  # a trend through fewer points is noise


class LoadPredictor(Protocol):
    def observe(self, time_s: float, value: float | None) -> None: ...

    def predict(self, horizon_s: float) -> float: ...


class ConstantPredictor:
    def __init__(self, initial: float = 0.0):
        self._last = initial

    def observe(self, time_s: float, value: float | None) -> None:
        if not is_missing(value):
            self._last = float(value)

    def predict(self, horizon_s: float) -> float:
        return self._last


class MovingAveragePredictor:
    def __init__(self, window: int, initial: float = 0.0):
        if window < 1:
            raise ValueError(f"moving average window must be >= 1, got {window}")
        self._values: deque[float] = deque(maxlen=window)
        self._initial = initial

    def observe(self, time_s: float, value: float | None) -> None:
        if not is_missing(value):
            self._values.append(float(value))

    def predict(self, horizon_s: float) -> float:
        if not self._values:
            return self._initial
        return sum(self._values) / len(self._values)


class LinearTrendPredictor:
    def __init__(self, window: int, initial: float = 0.0):
        if window < 2:
            raise ValueError(f"linear trend window must be >= 2, got {window}")
        self._points: deque[tuple[float, float]] = deque(maxlen=window)
        self._initial = initial

    def observe(self, time_s: float, value: float | None) -> None:
        if not is_missing(value):
            self._points.append((float(time_s), float(value)))

    def predict(self, horizon_s: float) -> float:
        points = self._points
        if len(points) < 2:
            return points[-1][1] if points else self._initial
        mean_t = sum(t for t, _ in points) / len(points)
        mean_v = sum(v for _, v in points) / len(points)
        spread = sum((t - mean_t) ** 2 for t, _ in points)
        slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0
        return max(0.0, mean_v + slope * (points[-1][0] + horizon_s - mean_t))


class DampedTrendPredictor:
    def __init__(self, window: int, damping: float = 0.85, initial: float = 0.0):
        if window < 1:
            raise ValueError(f"damped trend window must be >= 1, got {window}")
        if not 0.0 <= damping <= 1.0:
            raise ValueError(f"damping must be in [0, 1], got {damping}")
        # Smoothing weights of an exponential average spanning `window` values (its centre of
        # mass lies (window - 1) / 2 values back, as a moving average's does).
        self.level_weight = 2.0 / (window + 1)
        self.trend_weight = self.level_weight / 2
        self.damping = damping
        self._level: float | None = None
        self._trend_per_s = 0.0
        self._time_s = 0.0
        self._step_s = 0.0
        self._initial = initial

    def observe(self, time_s: float, value: float | None) -> None:
        if is_missing(value):
            return
        value, time_s = float(value), float(time_s)
        if self._level is None:
            self._level, self._time_s = value, time_s
            return
        step_s = time_s - self._time_s
        if step_s <= 0:
            return
        previous = self._level
        expected = previous + self._trend_per_s * step_s
        self._level = self.level_weight * value + (1 - self.level_weight) * expected
        slope = (self._level - previous) / step_s
        self._trend_per_s = (self.trend_weight * slope
                             + (1 - self.trend_weight) * self.damping * self._trend_per_s)
        self._time_s, self._step_s = time_s, step_s

    def predict(self, horizon_s: float) -> float:
        if self._level is None:
            return self._initial
        if self._step_s <= 0 or self.damping == 0:
            return self._level
        steps = horizon_s / self._step_s
        # Sum of damping^i for i = 1..steps: how far the trend carries, in steps.
        carried = (steps if self.damping == 1 else
                   self.damping * (1 - self.damping ** steps) / (1 - self.damping))
        return max(0.0, self._level + self._trend_per_s * self._step_s * carried)


class HoltWintersPredictor:
    def __init__(self, season_s: float, buckets_per_season: int = 96, seasons_kept: int = 4,
                 refit_s: float | None = None):
        try:
            from statsmodels.tsa.holtwinters import ExponentialSmoothing
        except ImportError:
            raise ValueError("predictor 'holt_winters' needs statsmodels: pip install "
                             "'tandem[planner]' (or statsmodels>=0.14), or choose 'constant' "
                             "or 'moving_average'") from None
        if buckets_per_season < 2:
            raise ValueError(f"buckets_per_season must be >= 2, got {buckets_per_season}")
        self._smoothing = ExponentialSmoothing
        self.season_buckets = buckets_per_season
        self.bucket_s = season_s / buckets_per_season
        self.refit_s = season_s / 4 if refit_s is None else refit_s
        self._buckets: deque[float] = deque(maxlen=seasons_kept * buckets_per_season)
        self._bucket_index: int | None = None   # the open bucket
        self._bucket_sum = 0.0
        self._bucket_count = 0
        self._last = 0.0
        self._now_s = 0.0
        self._params: dict[str, Any] | None = None
        self._params_kind = ""
        self._fitted_at_s = -math.inf
        self._forecast: list[float] = []          # from the closed buckets, one per bucket ahead

    def observe(self, time_s: float, value: float | None) -> None:
        if is_missing(value):
            return
        index = math.floor(time_s / self.bucket_s)
        if self._bucket_index is not None and index > self._bucket_index:
            self._close_buckets(index)
        if self._bucket_index is None:
            self._bucket_index = index
        self._bucket_sum += float(value)
        self._bucket_count += 1
        self._last = float(value)
        self._now_s = time_s

    def predict(self, horizon_s: float) -> float:
        if len(self._buckets) < MIN_TREND_BUCKETS:
            return self._last
        if not self._forecast:
            self._forecast = self._fit_and_forecast()
        # Steps ahead of the last closed bucket: the open one is step 1.
        target = math.floor((self._now_s + horizon_s) / self.bucket_s)
        steps = max(1, target - self._bucket_index + 1)
        return max(0.0, self._forecast[min(steps, len(self._forecast)) - 1])

    def _close_buckets(self, new_index: int) -> None:
        mean = self._bucket_sum / self._bucket_count
        # Buckets without a sample (the adapter was down) repeat the last mean: a gap is not
        # zero load, and Holt-Winters needs evenly spaced points.
        for _ in range(new_index - self._bucket_index):
            self._buckets.append(mean)
        self._bucket_index = new_index
        self._bucket_sum, self._bucket_count = 0.0, 0
        self._forecast = []

    def _fit_and_forecast(self) -> list[float]:
        seasonal = len(self._buckets) >= 2 * self.season_buckets
        kind = "seasonal" if seasonal else "trend"
        model = self._smoothing(
            list(self._buckets), trend="add", damped_trend=True,
            seasonal="add" if seasonal else None,
            seasonal_periods=self.season_buckets if seasonal else None,
            initialization_method="heuristic" if seasonal else "estimated")
        refit = (self._params is None or kind != self._params_kind
                 or self._now_s - self._fitted_at_s >= self.refit_s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on flat series
            if refit:
                result = model.fit()
                self._params = {k: float(result.params[k]) for k in _FIT_PARAMS
                                if not math.isnan(result.params.get(k, math.nan))}
                self._params_kind, self._fitted_at_s = kind, self._now_s
                logger.debug("holt-winters %s refit on %d buckets: %s", kind,
                             len(self._buckets), self._params)
            else:
                result = model.fit(optimized=False, **self._params)
        return [float(v) for v in result.forecast(self.season_buckets)]


_FIT_PARAMS = ("smoothing_level", "smoothing_trend", "smoothing_seasonal", "damping_trend")


def make_predictor(config: PlannerConfig) -> LoadPredictor:
    """The request-rate predictor `config.predictor` names."""
    if config.predictor == "constant":
        return ConstantPredictor()
    if config.predictor == "moving_average":
        return MovingAveragePredictor(config.predictor_window)
    if config.predictor == "linear_trend":
        return LinearTrendPredictor(max(2, config.predictor_window))
    if config.predictor == "damped_trend":
        return DampedTrendPredictor(config.predictor_window, config.trend_damping)
    return HoltWintersPredictor(config.season_s)
