"""The `tandem_planner_*` metrics: one home for their names, kinds, labels and help text.

The planner core exports nothing itself (it does no I/O); the adapter that runs it next to the
frontend registers these with prometheus_client and sets them from each `Decision`. Advisory mode
exports the same series, so an operator can watch what the planner would do before turning it on.

- `tandem_planner_target_workers{pool}`: the decision's target per pool
  (`pool` is prefill, decode or both).
- `tandem_planner_current_workers{pool}`: the pools as observed on that tick.
- `tandem_planner_decisions_total{kind}`: decisions by `Decision.kind`
  (hold, scale_up, scale_down, flip, mixed).
- `tandem_planner_actions_total{action}`: actions by type (add, remove, flip).
- `tandem_planner_last_decision`: an info metric whose `reason` label is the last reason, plus
  `kind` and `advisory`.
- `tandem_planner_predicted_request_rate_per_s`: the rate the targets were sized for.
- `tandem_planner_observed_request_rate_per_s`: the rate the last observation carried (0 when none).
- `tandem_planner_advisory`: 1 when decisions are not applied.
- `tandem_planner_flip_seconds{phase}`: the last role flip, by phase (drain, switch, total).
- `tandem_planner_failed_actions_total{action}`: actions the adapter could not carry out.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.planner.observation import AddWorker, FlipRole, RemoveWorker


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: str                          # prometheus_client class: Gauge, Counter or Info
    labels: tuple[str, ...]
    help: str


TARGET_WORKERS = MetricSpec("tandem_planner_target_workers", "Gauge", ("pool",),
                            "Workers the planner wants in each pool")
CURRENT_WORKERS = MetricSpec("tandem_planner_current_workers", "Gauge", ("pool",),
                             "Workers observed in each pool")
DECISIONS_TOTAL = MetricSpec("tandem_planner_decisions_total", "Counter", ("kind",),
                             "Planner decisions by kind (hold, scale_up, scale_down, flip, mixed)")
ACTIONS_TOTAL = MetricSpec("tandem_planner_actions_total", "Counter", ("action",),
                           "Planner actions by type (add, remove, flip)")
LAST_DECISION = MetricSpec("tandem_planner_last_decision", "Info", (),
                           "The last decision: reason, kind, advisory")
PREDICTED_RATE = MetricSpec("tandem_planner_predicted_request_rate_per_s", "Gauge", (),
                            "Request rate the pools were sized for")
OBSERVED_RATE = MetricSpec("tandem_planner_observed_request_rate_per_s", "Gauge", (),
                           "Request rate in the last observation")
ADVISORY = MetricSpec("tandem_planner_advisory", "Gauge", (),
                      "1 when the planner only advises, 0 when its decisions are applied")

FLIP_SECONDS = MetricSpec("tandem_planner_flip_seconds", "Gauge", ("phase",),
                          "The last role flip: drain, switch and total seconds")
FAILED_ACTIONS = MetricSpec("tandem_planner_failed_actions_total", "Counter", ("action",),
                            "Actions the adapter could not carry out (add, remove, flip)")

ALL_METRICS = (TARGET_WORKERS, CURRENT_WORKERS, DECISIONS_TOTAL, ACTIONS_TOTAL, LAST_DECISION,
               PREDICTED_RATE, OBSERVED_RATE, ADVISORY, FLIP_SECONDS, FAILED_ACTIONS)

ACTION_LABELS = {AddWorker: "add", RemoveWorker: "remove", FlipRole: "flip"}
