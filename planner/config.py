"""The online planner's knobs, their defaults, and the SLO parser.

One `PlannerConfig` holds every setting of the planner core; `tandem serve --planner ... --slo ...`
and the YAML keys of the same names build it, and nothing else keeps a second default.

- `mode`: `off` (no planner runs), `advisory` (decisions are computed, logged and exported, never
  applied) or `on` (the adapter applies them).
- `interval_s`: how often `on_tick` runs, and the window each observation covers.
- `ttft_ms`, `itl_ms`: the SLO the pools are sized for (time to first token, inter-token latency).
- `layout`: which pools to size. `disagg`: a prefill pool and a decode pool. `agg`: one pool of
  aggregated (`both`) workers. `auto`: size both layouts and keep the one that needs fewer GPUs,
  changing layout only when the other one saves a GPU (the measured 2x H200 runs in DESIGN.md show
  the best layout depends on the workload).
- `min_*` / `max_*`: per-pool bounds in workers; a bound of None means "up to the GPU budget".
  Minimums apply to the pools the layout uses. `gpu_budget` caps the GPUs all workers hold
  together; `gpus_per_worker` is the tensor-parallel width of one worker.
- `attainment`: the share of requests the SLO is sized for. The pools are big enough when the
  requests that wait past the TTFT bound for a prefill worker, those whose first gap after the
  hand-over passes the ITL bound, and those too long to meet the bound even on an idle worker add
  up to at most `1 - attainment` (planner.miss_budget); when that is out of reach, each pool is
  sized on its own and the decision says the SLO cannot be met.
- `predictor`: `constant` (last value), `moving_average` (last `predictor_window` intervals),
  `linear_trend` (a least-squares line through the last `predictor_window` intervals),
  `damped_trend` (Holt smoothing over about `predictor_window` intervals, its trend fading by
  `trend_damping` per interval ahead) or `holt_winters` (trend and a daily season, `season_s`;
  needs statsmodels).
- `shape_window`: the workload's shape (lengths, prompt-length mix, hit rate, arrival dispersion)
  is averaged over this many intervals; None: `predictor_window`.
- `worker_start_s`: how long a new worker takes from being asked for to serving (loading weights
  and warming up). The pools are sized for the rate predicted that long plus one interval ahead,
  so a trend predictor asks for workers before the load that needs them arrives.
- `max_utilization`: the busy fraction a prefill worker (or the decode token throughput at the
  ITL-meeting batch) is sized for. Queueing delay grows as 1/(1 - utilization); past 0.8 a small
  burst doubles the wait.
- `hold_s`: hysteresis. Scaling up happens on the tick that needs it; scaling down only after the
  lower target has held for `hold_s`, so a load hovering at a threshold cannot cause 2<->1 swings.
- `scale_down_margin`: a pool shrinks only if the smaller pool still meets the SLO with this much
  more load than predicted (the second band of the hysteresis, on load instead of time).
- `cooldown_s`: after an action, no removal or flip until this long has passed, so the metrics of
  the new shape are seen first. Additions are not delayed: a pending worker already counts as
  capacity, which is what keeps an add from being issued twice.
- `max_changes_per_interval`: the most actions one decision carries.
- `ready_timeout_s`: a new worker that is not ready this long after it was asked for counts as
  failed; the planner reports it, removes it, and asks for a replacement.
- `max_kv_usage`: a decode (or aggregated) worker is removed only if the rest would hold its KV
  blocks below this fraction of their memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

MODES = ("off", "advisory", "on")
LAYOUTS = ("disagg", "agg", "auto")
PREDICTORS = ("constant", "moving_average", "linear_trend", "damped_trend", "holt_winters")
SLO_KEYS = ("ttft_ms", "itl_ms")


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    mode: str = "off"                  # opt-in: a planner that moves GPUs is never a surprise
    interval_s: float = 30.0           # many requests per window at moderate rates, short next
                                       # to a cold start (minutes)
    ttft_ms: float = 500.0             # interactive chat: first token within half a second
    itl_ms: float = 40.0               # 25 tokens/s, faster than reading; the worst-gap bound
                                       # the 2x H200 runs in DESIGN.md are measured against
    layout: str = "disagg"
    min_prefill: int = 1
    max_prefill: int | None = None
    min_decode: int = 1
    max_decode: int | None = None
    min_both: int = 1
    max_both: int | None = None
    gpu_budget: int = 8                # one 8-GPU host
    gpus_per_worker: int = 1
    attainment: float = 0.99           # the SLO is a bound most requests meet, not a mean
    predictor: str = "constant"        # needs no history and no extra package
    predictor_window: int = 4          # moving average over two minutes at the default interval
    shape_window: int | None = None    # intervals the workload's shape is averaged over;
                                       # None: predictor_window
    worker_start_s: float = 120.0      # a cold start of an 8B model: minutes, not seconds
    trend_damping: float = 0.85        # a trend read three intervals ahead carries ~2.2 of them
    season_s: float = 86400.0          # daily swings
    max_utilization: float = 0.8
    hold_s: float = 180.0              # six intervals: a dip must last three minutes
    scale_down_margin: float = 0.1
    cooldown_s: float = 60.0           # two intervals: one full window of the new shape
    max_changes_per_interval: int = 2
    ready_timeout_s: float = 600.0     # weights of a 70B model load in minutes; ten is a failure
    max_kv_usage: float = 0.85         # leave room for the running requests' growing outputs

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("predictor", self.predictor, PREDICTORS)
        for name in ("interval_s", "ttft_ms", "itl_ms", "season_s"):
            _check_positive(name, getattr(self, name))
        for name in ("hold_s", "cooldown_s", "ready_timeout_s", "scale_down_margin",
                     "worker_start_s"):
            _check_non_negative(name, getattr(self, name))
        if not (math.isfinite(self.trend_damping) and 0.0 <= self.trend_damping <= 1.0):
            raise ValueError(f"trend_damping must be in [0, 1], got {self.trend_damping}")
        for name in ("max_utilization", "max_kv_usage", "attainment"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 < value <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        for name in ("gpu_budget", "gpus_per_worker", "predictor_window",
                     "max_changes_per_interval"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.shape_window is not None:
            _check_int("shape_window", self.shape_window, minimum=1)
        for role in ("prefill", "decode", "both"):
            self._check_bounds(role)

    def _check_bounds(self, role: str) -> None:
        low, high = getattr(self, f"min_{role}"), getattr(self, f"max_{role}")
        _check_int(f"min_{role}", low, minimum=0)
        if high is not None:
            _check_int(f"max_{role}", high, minimum=0)
            if high < low:
                raise ValueError(f"max_{role} ({high}) must be >= min_{role} ({low})")
        if low * self.gpus_per_worker > self.gpu_budget:
            raise ValueError(f"min_{role}={low} workers of {self.gpus_per_worker} GPU(s) exceed "
                             f"gpu_budget={self.gpu_budget}: lower min_{role} or raise the budget")

    @property
    def max_workers(self) -> int:
        """How many workers the GPU budget holds."""
        return self.gpu_budget // self.gpus_per_worker

    def pool_bounds(self, role: str) -> tuple[int, int]:
        """(min, max) workers of one pool, the max capped by the GPU budget."""
        high = getattr(self, f"max_{role}")
        cap = self.max_workers if high is None else min(high, self.max_workers)
        return getattr(self, f"min_{role}"), cap

    @property
    def is_advisory(self) -> bool:
        return self.mode != "on"


def parse_slo(spec: str | Iterable[str]) -> dict[str, float]:
    """`"ttft_ms=500 itl_ms=40"` or `["ttft_ms=500", "itl_ms=40"]` -> {"ttft_ms": 500.0, ...}.

    The result is meant for `PlannerConfig(**parse_slo(...))`; keys left out keep their defaults.
    """
    items = spec.split() if isinstance(spec, str) else [p for s in spec for p in s.split()]
    slo: dict[str, float] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not text:
            raise ValueError(f"SLO item {item!r} must look like key=value, e.g. ttft_ms=500")
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO key {key!r}: the planner knows {list(SLO_KEYS)}")
        if key in slo:
            raise ValueError(f"SLO key {key!r} given twice")
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"SLO {key} must be a number of milliseconds, got {text!r}") from None
        _check_positive(key, value)
        slo[key] = value
    return slo


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
