"""The planner policy on scripted observations: stability, zero traffic, stuck starts, flips."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from tandem.planner.config import PlannerConfig
from tandem.planner.observation import (AddWorker, FlipRole, Observation, RemoveWorker,
                                        WorkerView)
from tandem.planner.policy import Planner, merged_mix
from tests.planner.test_sizing import LinearPerfModel

INTERVAL_S = 30.0


def make_planner(**overrides) -> Planner:
    settings = dict(mode="on", interval_s=INTERVAL_S, gpu_budget=8, hold_s=180.0,
                    cooldown_s=60.0, ready_timeout_s=300.0)
    settings.update(overrides)
    return Planner(PlannerConfig(**settings), LinearPerfModel())


class Cluster:
    """A scripted deployment that applies decisions: adds show up ready after `start_ticks`."""

    def __init__(self, num_prefill: int, num_decode: int, start_ticks: int = 1,
                 never_ready: bool = False):
        self.workers = {f"p{i}": "prefill" for i in range(num_prefill)}
        self.workers.update({f"d{i}": "decode" for i in range(num_decode)})
        self.starting: dict[str, int] = {}
        self.start_ticks, self.never_ready = start_ticks, never_ready
        self.num_started = 0

    def observe(self, t: float, rate: float | None, isl: float = 4096, osl: float = 256,
                **latencies) -> Observation:
        views = tuple(WorkerView(wid, role, is_ready=wid not in self.starting)
                      for wid, role in sorted(self.workers.items()))
        return Observation(t, INTERVAL_S, rate, isl if rate else None, osl if rate else None,
                           0.0, workers=views, **latencies)

    def apply(self, decision) -> None:
        if not self.never_ready:
            self.starting = {w: n - 1 for w, n in self.starting.items() if n > 1}
        for action in decision.actions:
            if isinstance(action, AddWorker):
                wid = f"new{self.num_started}"
                self.num_started += 1
                self.workers[wid] = action.role
                self.starting[wid] = self.start_ticks
            elif isinstance(action, RemoveWorker):
                self.workers.pop(action.worker_id)
                self.starting.pop(action.worker_id, None)
            elif isinstance(action, FlipRole):
                self.workers[action.worker_id] = action.to_role

    def pools(self) -> tuple[int, int]:
        roles = list(self.workers.values())
        return roles.count("prefill"), roles.count("decode")


def run(planner: Planner, cluster: Cluster, rates, start_s: float = 0.0, **kw):
    decisions = []
    for tick, rate in enumerate(rates):
        decision = planner.on_tick(cluster.observe(start_s + tick * INTERVAL_S, rate, **kw))
        cluster.apply(decision)
        decisions.append(decision)
    return decisions


# The core behaviours hold with the default predictor and with the bench's damped trend.
PREDICTORS = pytest.mark.parametrize("predictor", ["constant", "damped_trend"])


@PREDICTORS
def test_steady_load_gives_no_changes(predictor):
    decisions = run(make_planner(predictor=predictor), Cluster(1, 1), [3.0] * 40)
    assert all(d.is_hold for d in decisions)
    assert (decisions[-1].num_prefill, decisions[-1].num_decode) == (1, 1)


@PREDICTORS
def test_step_up_scales_up_within_one_interval(predictor):
    planner, cluster = make_planner(predictor=predictor), Cluster(1, 1)
    run(planner, cluster, [3.0] * 10)
    decision = planner.on_tick(cluster.observe(10 * INTERVAL_S, 14.0))
    assert decision.num_prefill == 3 and decision.num_decode == 2
    assert decision.kind == "scale_up" and len(decision.actions) == 2   # max 2 per interval
    cluster.apply(decision)
    rest = run(planner, cluster, [14.0] * 3, start_s=11 * INTERVAL_S)
    assert cluster.pools() == (3, 2)
    assert sum(len(d.actions) for d in rest) == 1    # the third add, not a repeat of the first two


@PREDICTORS
def test_zero_traffic_with_nan_metrics_reaches_the_minimum(predictor):
    planner, cluster = make_planner(predictor=predictor), Cluster(4, 3)
    nan = math.nan
    decisions = run(planner, cluster, [nan] * 20, ttft_p90_ms=nan, itl_p90_ms=nan)
    assert cluster.pools() == (1, 1)
    assert decisions[-1].predicted_rate_per_s == 0.0
    first_change = next(i for i, d in enumerate(decisions) if d.actions)
    assert first_change * INTERVAL_S >= 180.0           # not before the hold period


@PREDICTORS
def test_oscillating_load_changes_at_most_once_per_hold_period(predictor):
    planner, cluster = make_planner(predictor=predictor), Cluster(1, 1)
    rates = [3.0, 6.0] * 30                                # 6 req/s needs a second prefill worker
    decisions = run(planner, cluster, rates)
    change_times = [d.time_s for d in decisions if d.actions]
    assert len(change_times) == 1
    assert cluster.pools() == (2, 1)


def test_scale_down_waits_for_hold_and_respects_margin():
    planner, cluster = make_planner(scale_down_margin=0.1), Cluster(1, 1)
    run(planner, cluster, [14.0] * 4)
    assert cluster.pools() == (3, 2)
    decisions = run(planner, cluster, [2.0] * 12, start_s=4 * INTERVAL_S)
    downs = [i for i, d in enumerate(decisions) if d.actions]
    assert downs and downs[0] * INTERVAL_S >= 180.0 - INTERVAL_S
    assert cluster.pools() == (1, 1)


def test_scale_down_margin_is_taken_over_the_forecast_not_the_last_window():
    # One prefill worker serves up to 3.7 req/s in this model. On a falling rate the margin over
    # the last window's rate (what a constant predictor forecasts) holds two workers down to
    # 3.3 req/s; over a trend's forecast, the pool shrinks once the rate itself is below 3.7.
    rates = [6.0, 5.5, 5.0, 4.5, 4.0, 3.6, 3.5, 3.4, 3.3, 3.2, 3.1, 3.0]
    first_shrink = {}
    for predictor in ("constant", "damped_trend"):
        planner = make_planner(predictor=predictor, predictor_window=2, trend_damping=1.0,
                               hold_s=INTERVAL_S, cooldown_s=0.0, scale_down_margin=0.1)
        decisions = run(planner, Cluster(2, 1), rates)
        first_shrink[predictor] = next(i for i, d in enumerate(decisions) if d.num_prefill == 1)
    assert first_shrink == {"constant": 10, "damped_trend": 6}


def test_worker_that_never_becomes_ready_is_replaced():
    planner = make_planner(ready_timeout_s=120.0, cooldown_s=0.0)
    cluster = Cluster(1, 1, never_ready=True)
    decisions = run(planner, cluster, [12.0] * 12)
    adds = [a for d in decisions for a in d.actions if isinstance(a, AddWorker)]
    removes = [a for d in decisions for a in d.actions if isinstance(a, RemoveWorker)]
    assert len(adds) >= 2 and removes and removes[0].worker_id == "new0"
    assert any("not ready after 120 s" in d.reason for d in decisions)


def test_add_that_never_appears_is_asked_again():
    planner = make_planner(ready_timeout_s=120.0)
    cluster = Cluster(1, 1)
    first = planner.on_tick(cluster.observe(0.0, 6.0))
    assert first.actions == (AddWorker("prefill"),)       # not applied: it never shows up
    later = [planner.on_tick(cluster.observe(t * INTERVAL_S, 6.0)) for t in range(1, 6)]
    assert [d.actions for d in later[:3]] == [(), (), ()]
    assert later[3].actions == (AddWorker("prefill"),)
    assert "never appeared" in later[3].reason


def test_flip_is_preferred_over_remove_and_add():
    planner, cluster = make_planner(), Cluster(2, 1)
    # Short prompts and long outputs: one prefill worker is plenty, decode needs a second.
    decision = planner.on_tick(cluster.observe(0.0, 5.0, isl=256, osl=2048))
    assert decision.actions == (FlipRole("p0", "decode"),)
    assert (decision.num_prefill, decision.num_decode) == (1, 2)


def test_a_slow_first_token_does_not_hold_an_idle_prefill_pool():
    # Prompts below the remote-prefill threshold: the decode worker prefills them, and its queue
    # is what makes the first token slow. The idle prefill worker flips to decode at once.
    planner, cluster = make_planner(gpu_budget=2, min_prefill=0), Cluster(1, 1)
    decision = planner.on_tick(cluster.observe(0.0, 5.0, isl=128, osl=2048, ttft_p90_ms=5000.0))
    assert decision.actions == (FlipRole("p0", "decode"),)
    # The same wait with prompts that reach the prefill pool keeps it.
    planner, cluster = make_planner(gpu_budget=2, min_prefill=0), Cluster(1, 1)
    decision = planner.on_tick(cluster.observe(0.0, 5.0, isl=4096, osl=2048, ttft_p90_ms=5000.0))
    assert not any(isinstance(a, FlipRole) and a.to_role == "decode" for a in decision.actions)


def test_gpu_budget_and_maximums_bound_the_pools():
    planner, cluster = make_planner(gpu_budget=4, max_decode=1), Cluster(1, 1)
    run(planner, cluster, [60.0] * 6)
    prefill, decode = cluster.pools()
    assert prefill + decode == 4 and decode == 1


def test_advisory_mode_computes_without_recording():
    planner, cluster = make_planner(mode="advisory"), Cluster(1, 1)
    decisions = [planner.on_tick(cluster.observe(t * INTERVAL_S, 12.0)) for t in range(3)]
    assert all(d.is_advisory for d in decisions)
    assert all(len(d.actions) == 2 for d in decisions)    # the same advice each tick


def test_scale_down_blocked_while_the_pool_is_near_its_slo():
    planner, cluster = make_planner(), Cluster(3, 2)
    decisions = run(planner, cluster, [2.0] * 12, ttft_p90_ms=450.0, itl_p90_ms=10.0)
    assert cluster.pools()[0] == 3
    assert "TTFT p90" in decisions[-1].reason


def test_prompt_length_mixes_of_several_intervals_merge_by_request_count():
    # 30 requests of 1k tokens, then 10 requests, half of them 64k tokens.
    merged = merged_mix([(30.0, ((1024.0, 1.0),)), (10.0, ((1024.0, 0.5), (65536.0, 0.5)))])
    assert merged == ((1024.0, 0.75), (1024.0, 0.125), (65536.0, 0.125))
    assert merged_mix([]) == ()


def test_one_window_of_long_prompts_is_averaged_with_the_ones_before():
    planner, cluster = make_planner(predictor_window=4), Cluster(1, 1)
    short = ((1024.0, 1.0),)
    for tick in range(3):
        planner.on_tick(replace(cluster.observe(tick * INTERVAL_S, 4.0, isl=1024),
                                input_tokens_mix=short))
    spike = replace(cluster.observe(3 * INTERVAL_S, 4.0, isl=16384),
                    input_tokens_mix=((16384.0, 1.0),))
    alone = make_planner().on_tick(spike)
    averaged = planner.on_tick(spike)
    assert averaged.num_prefill < alone.num_prefill
