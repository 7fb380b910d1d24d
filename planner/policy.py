"""The online planner's policy: `Planner.on_tick(Observation) -> Decision`, pure and cheap.

Each tick (every `interval_s`, planner.config):

1. Load. The request rate feeds the predictor; the pools are sized for max(rate now, rate
   predicted `interval_s + worker_start_s` ahead, when a worker asked for now has served an
   interval), so a step up is met on the tick that sees it and a rise that a trend predictor sees
   coming is met before it arrives. A missing rate (NaN or None: no requests in the window) is
   zero load, so zero traffic reaches the minimum pools. The workload's shape (lengths, the
   prompt-length mix, hit rate, arrival dispersion) is averaged over the last `shape_window`
   intervals that saw it, so a few long prompts in one window do not move GPUs; a missing value
   is skipped.
2. Targets. planner.sizing gives the smallest pools that meet the SLO at that load (`up`), and
   again at (1 + scale_down_margin) times the larger forecast, for the next interval and for a
   cold start ahead (`down`, the band a pool must clear to shrink). The margin is taken over the
   forecast, not over the last window's rate: that rate already sets `up`, and a margin on top of
   one noisy minute held a worker for the hold period; with the constant predictor the two are
   the same.
   When the clients already see TTFT (or ITL) above the SLO and no worker is on its way to that
   pool, the pool gets one more worker than it has: the model missed something, the metrics did
   not.
3. Hysteresis. A pool grows to `up` at once. It shrinks only to the largest `down` seen over the
   last `hold_s`, and only once the planner has watched that long, so a load hovering at a
   threshold changes a pool at most once per hold period (no 2<->1 swings).
4. Scale-down check on what the workers report: a pool does not shrink while its observed p90
   latency is above SHRINK_LATENCY_FRACTION of the SLO, nor when the workers left would hold more
   KV than `max_kv_usage` of their memory (the requests of the one leaving move to them).
5. Cooldown. For `cooldown_s` after an action nothing is removed or flipped; additions go on,
   because pending workers already count as capacity (planner.worker_tracking).
6. Actions (planner.scaling_actions): replace workers that never became ready, flip before
   add/remove when one pool shrinks as another grows, at most `max_changes_per_interval`.

In advisory mode (and when off) the same decision is computed and flagged `is_advisory`; nothing is
recorded as pending, so the counts keep following the observation.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import replace

from tandem.engine.config import EngineConfig
from tandem.planner.config import PlannerConfig
from tandem.planner.observation import ROLES, Decision, Observation, is_missing
from tandem.planner.predictors import LoadPredictor, MovingAveragePredictor, make_predictor
from tandem.planner.scaling_actions import ActionLimits, choose_actions
from tandem.planner.sizing import (Load, PerfModel, PoolPlan, SizingTarget, plan_pools,
                                   remote_part)
from tandem.planner.worker_tracking import WorkerTracker
from tandem.router.routing import RoutingConfig

logger = logging.getLogger(__name__)

SHRINK_LATENCY_FRACTION = 0.8   # a pool this close to its SLO has no capacity to give away
DEFAULT_INPUT_TOKENS = 1024.0   # used until a length is observed; at zero load they size nothing
DEFAULT_OUTPUT_TOKENS = 128.0


class Planner:
    def __init__(self, config: PlannerConfig, perf_model: PerfModel,
                 predictor: LoadPredictor | None = None, max_batch_size: int = 256,
                 chunk_tokens: int = 512, prefill_chunk_tokens: int | None = None,
                 routing: RoutingConfig | None = None):
        self.config = config
        self._perf = perf_model
        self._rate = predictor if predictor is not None else make_predictor(config)
        # The workload's shape is averaged over the last `shape_window` intervals: one window's
        # handful of 100k-token prompts must not move GPUs for minutes (the rate is not averaged).
        window = config.shape_window or config.predictor_window
        self._input_tokens = MovingAveragePredictor(window, DEFAULT_INPUT_TOKENS)
        self._output_tokens = MovingAveragePredictor(window, DEFAULT_OUTPUT_TOKENS)
        self._hit_rate = MovingAveragePredictor(window, 0.0)
        self._dispersion = MovingAveragePredictor(window, 1.0)   # Poisson until bursts are seen
        self._mixes: deque[tuple[float, tuple[tuple[float, float], ...]]] = deque(maxlen=window)
        if prefill_chunk_tokens is None:  # what a prefill worker runs per step by default
            prefill_chunk_tokens = EngineConfig().max_num_batched_tokens
        routing = routing or RoutingConfig()  # which prompts reach the prefill pool, how many
        self._target = SizingTarget(config.ttft_ms, config.itl_ms, config.max_utilization,
                                    max_batch_size, chunk_tokens, prefill_chunk_tokens,
                                    config.attainment, routing.max_prefill_queue,
                                    routing.remote_prefill_min_tokens)
        self._bounds = {role: config.pool_bounds(role) for role in ROLES}
        self._tracker = WorkerTracker(config.ready_timeout_s)
        self._history: deque[tuple[float, dict[str, int]]] = deque()  # (time_s, down target)
        self._last_action_s = -math.inf
        self._layout = "agg" if config.layout == "agg" else "disagg"

    def on_tick(self, obs: Observation) -> Decision:
        notes = self._tracker.update(obs)
        load, predicted_rate = self._load(obs)
        current = self._tracker.effective_counts(obs)
        plan = self._plan(load, self.config.layout)
        # The margin goes over the forecasts (the next interval, a cold start ahead), not over
        # the last window's rate: that rate already sets `up`, and is the noisiest of the three.
        keep_rate = max(self._rate.predict(self.config.interval_s), predicted_rate)
        margin_load = replace(load, request_rate_per_s=keep_rate
                              * (1 + self.config.scale_down_margin))
        down = _counts(self._plan(margin_load, plan.layout))
        up = self._react_to_slo(obs, plan, current, notes)
        settled = self._settle(obs.time_s, up, down, current, notes)
        limits = self._limits(obs, load, settled, down, current, notes)
        actions, after = choose_actions(obs, current, settled, self._tracker.failed_ids,
                                        {w.worker_id for w in obs.workers
                                         if self._tracker.is_busy(w.worker_id)}, limits)
        if actions and not self.config.is_advisory:
            self._tracker.record(actions, obs.time_s)
            self._last_action_s = obs.time_s
            self._layout = plan.layout
        final = {role: min(settled[role], after[role]) if after[role] < current[role]
                 else settled[role] for role in ROLES}
        reason = _reason(load, predicted_rate, plan, current, final, notes)
        decision = Decision(obs.time_s, final["prefill"], final["decode"], final["both"],
                            tuple(actions), reason, self.config.is_advisory, load.request_rate_per_s)
        logger.log(logging.INFO if actions else logging.DEBUG, "planner %s%s: %s", decision.kind,
                   " (advisory)" if decision.is_advisory else "", reason)
        return decision

    def _load(self, obs: Observation) -> tuple[Load, float]:
        rate_now = 0.0 if is_missing(obs.request_rate_per_s) else float(obs.request_rate_per_s)
        self._rate.observe(obs.time_s, rate_now)
        # A worker asked for now serves after its start-up, for an interval at least.
        horizon_s = self.config.interval_s + self.config.worker_start_s
        predicted = max(0.0, self._rate.predict(horizon_s))
        self._input_tokens.observe(obs.time_s, obs.mean_input_tokens)
        self._output_tokens.observe(obs.time_s, obs.mean_output_tokens)
        self._hit_rate.observe(obs.time_s, obs.prefix_hit_rate)
        self._dispersion.observe(obs.time_s, obs.arrival_dispersion)
        if obs.input_tokens_mix and rate_now > 0:
            self._mixes.append((rate_now * obs.interval_s, obs.input_tokens_mix))
        hit_rate = min(max(self._hit_rate.predict(0.0), 0.0), 1.0)
        load = Load(max(rate_now, predicted), max(1.0, self._input_tokens.predict(0.0)),
                    max(1.0, self._output_tokens.predict(0.0)), hit_rate,
                    merged_mix(self._mixes), max(1.0, self._dispersion.predict(0.0)))
        return load, predicted

    def _plan(self, load: Load, layout: str) -> PoolPlan:
        return plan_pools(self._perf, load, self._target, layout, self._bounds,
                          self.config.max_workers, self._layout)

    def _react_to_slo(self, obs: Observation, plan: PoolPlan, current: dict[str, int],
                      notes: list[str]) -> dict[str, int]:
        up = _counts(plan)
        slow_ttft = not is_missing(obs.ttft_p90_ms) and obs.ttft_p90_ms > self.config.ttft_ms
        slow_itl = not is_missing(obs.itl_p90_ms) and obs.itl_p90_ms > self.config.itl_ms
        roles = {"prefill": slow_ttft, "decode": slow_itl, "both": slow_ttft or slow_itl}
        for role, is_slow in roles.items():
            if not is_slow or up[role] == 0 or self._tracker.has_pending(role):
                continue
            bumped = min(current[role] + 1, self._bounds[role][1])
            if bumped > up[role]:
                up[role] = bumped
                notes.append(f"observed p90 over the SLO (TTFT {obs.ttft_p90_ms} ms, ITL "
                             f"{obs.itl_p90_ms} ms): one more {role} worker than the model asks")
        return up

    def _settle(self, now: float, up: dict[str, int], down: dict[str, int],
                current: dict[str, int], notes: list[str]) -> dict[str, int]:
        self._history.append((now, {r: max(up[r], down[r]) for r in ROLES}))
        horizon_s = now - self.config.hold_s
        while len(self._history) > 1 and self._history[1][0] <= horizon_s:
            self._history.popleft()
        is_covered = self._history[0][0] <= horizon_s
        settled = {}
        for role in ROLES:
            if up[role] >= current[role]:
                settled[role] = up[role]
                continue
            floor = max(entry[role] for _, entry in self._history)
            settled[role] = min(current[role], floor) if is_covered else current[role]
            if settled[role] == current[role] and down[role] < current[role]:
                notes.append(f"{role} could shrink to {down[role]}; holding {current[role]} "
                             f"until the lower target lasts {self.config.hold_s:.0f} s")
        return settled

    def _limits(self, obs: Observation, load: Load, settled: dict[str, int], down: dict[str, int],
                current: dict[str, int], notes: list[str]) -> ActionLimits:
        in_cooldown = obs.time_s - self._last_action_s < self.config.cooldown_s
        may_shrink, flip_floor = set(), dict(current)
        for role in ROLES:
            wants_fewer = min(settled[role], down[role]) < current[role]
            if not wants_fewer:
                continue
            if in_cooldown:
                notes.append(f"cooldown: no {role} removal or flip until "
                             f"t={self._last_action_s + self.config.cooldown_s:.0f} s")
                continue
            blocker = self._shrink_blocker(obs, load, role, current[role] - 1)
            if blocker:
                notes.append(f"{role} keeps {current[role]}: {blocker}")
                continue
            flip_floor[role] = min(settled[role], down[role])
            if settled[role] < current[role]:
                may_shrink.add(role)
        return ActionLimits(self.config.max_changes_per_interval, self.config.max_workers,
                            frozenset(may_shrink), flip_floor)

    def _shrink_blocker(self, obs: Observation, load: Load, role: str, remaining: int) -> str:
        """Why `role` must not lose a worker now, or "" if it may."""
        fraction = SHRINK_LATENCY_FRACTION
        # A slow first token counts against the prefill pool only while prompts reach it: when
        # every prompt is prefilled on its decode worker, the wait is the decode pool's.
        ttft_is_prefills = role == "both" or (role == "prefill"
                                              and self._prefills_remotely(obs, load))
        if ttft_is_prefills and not is_missing(obs.ttft_p90_ms) \
                and obs.ttft_p90_ms > fraction * self.config.ttft_ms:
            return f"TTFT p90 {obs.ttft_p90_ms:.0f} ms is near the {self.config.ttft_ms:.0f} ms SLO"
        if role in ("decode", "both") and not is_missing(obs.itl_p90_ms) \
                and obs.itl_p90_ms > fraction * self.config.itl_ms:
            return f"ITL p90 {obs.itl_p90_ms:.1f} ms is near the {self.config.itl_ms:.0f} ms SLO"
        if role in ("decode", "both") and remaining > 0:
            kv_used = sum(w.kv_usage for w in obs.pool(role) if w.is_ready)
            if kv_used / remaining > self.config.max_kv_usage:
                return (f"the {remaining} left would hold {kv_used / remaining:.0%} KV, above "
                        f"{self.config.max_kv_usage:.0%}")
        return ""

    def _prefills_remotely(self, obs: Observation, load: Load) -> bool:
        """Whether the prefill pool has work: prompts of the window reach it, or it holds some."""
        return (remote_part(load, self._target).request_rate_per_s > 0
                or _busy(obs.pool("prefill")))


def _busy(workers) -> bool:
    return any(w.num_requests > 0 for w in workers)


def merged_mix(mixes: Iterable[tuple[float, tuple[tuple[float, float], ...]]]
               ) -> tuple[tuple[float, float], ...]:
    """One prompt-length mix of several intervals', each weighted by its number of requests."""
    mixes = list(mixes)
    total = sum(weight for weight, _ in mixes)
    if total <= 0:
        return ()
    return tuple((tokens, share * weight / total) for weight, mix in mixes
                 for tokens, share in mix)


def _counts(plan: PoolPlan) -> dict[str, int]:
    return {"prefill": plan.num_prefill, "decode": plan.num_decode, "both": plan.num_both}


def _reason(load: Load, predicted_rate: float, plan: PoolPlan, current: dict[str, int],
            final: dict[str, int], notes: list[str]) -> str:
    shape = lambda c: f"{c['prefill']}P+{c['decode']}D+{c['both']}A"  # noqa: E731
    text = (f"load {load.request_rate_per_s:.2f} req/s (predicted {predicted_rate:.2f}), "
            f"ISL {load.mean_input_tokens:.0f}, OSL {load.mean_output_tokens:.0f}, "
            f"hit {load.prefix_hit_rate:.0%}; {shape(current)} -> {shape(final)}; {plan.note}")
    if not plan.meets_slo:
        text += "; SLO not reachable within the bounds"
    return "; ".join([text, *notes])
