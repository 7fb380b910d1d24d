"""What the online planner sees on each tick, and what it answers.

The planner core is `on_tick(Observation) -> Decision` (planner.policy). Both messages are frozen
dataclasses that cross the boundary between the pure core and the adapter that gathers metrics and
acts through the deployment layer; field names carry their units.

Observation: the load over the last interval (request rate, mean prompt and output lengths, the mix
of prompt lengths, prefix hit rate), the latencies the clients saw (TTFT and ITL percentiles), and one `WorkerView` per
worker the deployment runs, ready or still starting. Any load or latency field may be NaN or None
when there was no traffic in the interval: the planner treats a missing request rate as zero load
(no requests arrived) and a missing length or latency as "unknown", never as a reason to hold.

Decision: the target number of workers per pool, the actions that move the deployment towards it,
and a reason a person can read. A decision with no actions is a hold. Actions are:

- `AddWorker(role)`: start a new worker in that role (it shows up not ready while it loads);
- `RemoveWorker(worker_id)`: drain that worker and stop it;
- `FlipRole(worker_id, to_role)`: drain that worker and switch its role in place, keeping its
  weights and KV memory (seconds, where a cold start takes minutes).

`is_advisory` is set when the planner runs in advisory mode: the decision is computed the same way,
and the adapter only logs and exports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROLES = ("prefill", "decode", "both")


def _check_role(role: str, what: str) -> None:
    if role not in ROLES:
        raise ValueError(f"{what} must be one of {list(ROLES)}, got {role!r}")


def is_missing(value: float | None) -> bool:
    """True for a metric with no value this interval (None or NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    role: str                          # "prefill", "decode" or "both"
    is_ready: bool = True              # False while loading weights, warming up or flipping
    num_queued_requests: int = 0       # waiting for the engine, not yet scheduled
    num_running_requests: int = 0
    kv_usage: float = 0.0              # fraction of the KV blocks in use, 0..1

    def __post_init__(self) -> None:
        _check_role(self.role, f"worker {self.worker_id!r} role")
        if not 0.0 <= self.kv_usage <= 1.0:
            raise ValueError(f"worker {self.worker_id!r} kv_usage must be in [0, 1], "
                             f"got {self.kv_usage}")

    @property
    def num_requests(self) -> int:
        return self.num_queued_requests + self.num_running_requests


@dataclass(frozen=True, slots=True)
class Observation:
    time_s: float                      # monotonic clock of the adapter, seconds
    interval_s: float                  # length of the window the rates and percentiles cover
    request_rate_per_s: float | None = None
    mean_input_tokens: float | None = None
    mean_output_tokens: float | None = None
    prefix_hit_rate: float | None = None   # fraction of prompt tokens found cached, 0..1
    # (mean prompt tokens, share of the interval's requests) per prompt-length class; empty when
    # only the mean is known. Prefill time is convex in length: the mean prompt under-sizes.
    input_tokens_mix: tuple[tuple[float, float], ...] = ()
    # Variance over mean of the requests arriving in each second of the interval: 1 for Poisson
    # arrivals, about the batch size when requests come in batches; None when not measured.
    arrival_dispersion: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p90_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p90_ms: float | None = None
    workers: tuple[WorkerView, ...] = ()

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        ids = [w.worker_id for w in self.workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be unique within an observation, got {ids}")

    def pool(self, role: str) -> tuple[WorkerView, ...]:
        """The workers of one role, ready or not."""
        _check_role(role, "role")
        return tuple(w for w in self.workers if w.role == role)

    def num_ready(self, role: str) -> int:
        return sum(1 for w in self.pool(role) if w.is_ready)


@dataclass(frozen=True, slots=True)
class AddWorker:
    role: str

    def __post_init__(self) -> None:
        _check_role(self.role, "AddWorker role")


@dataclass(frozen=True, slots=True)
class RemoveWorker:
    worker_id: str


@dataclass(frozen=True, slots=True)
class FlipRole:
    worker_id: str
    to_role: str

    def __post_init__(self) -> None:
        _check_role(self.to_role, "FlipRole to_role")


Action = AddWorker | RemoveWorker | FlipRole


@dataclass(frozen=True, slots=True)
class Decision:
    time_s: float
    num_prefill: int                   # target pool sizes, in workers
    num_decode: int
    num_both: int                      # aggregated workers (prefill and decode in one engine)
    actions: tuple[Action, ...] = ()   # empty: hold
    reason: str = ""
    is_advisory: bool = False          # computed only; the adapter logs it and does not act
    predicted_rate_per_s: float = 0.0  # the load the targets were sized for

    @property
    def is_hold(self) -> bool:
        return not self.actions

    @property
    def kind(self) -> str:
        """One word for metrics: hold, scale_up, scale_down, flip or mixed."""
        kinds = {type(a) for a in self.actions}
        if not kinds:
            return "hold"
        if len(kinds) > 1:
            return "mixed"
        return {AddWorker: "scale_up", RemoveWorker: "scale_down", FlipRole: "flip"}[kinds.pop()]

    def target(self, role: str) -> int:
        _check_role(role, "role")
        return {"prefill": self.num_prefill, "decode": self.num_decode,
                "both": self.num_both}[role]
