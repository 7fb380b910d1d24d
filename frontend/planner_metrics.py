"""The frontend's side of the online planner: reading its counters, and exporting decisions.

`read_totals` takes one reading of the cumulative counts the planner's observation is built from
(planner.interval_stats): what the router routed, and the TTFT, ITL and end-to-end histograms the
pipeline records where the clients see them. `PlannerExporter` registers the `tandem_planner_*`
metrics (names and help in planner.metrics_names) on the frontend's Prometheus registry, so they
appear on its /metrics next to the serving metrics, and sets them from each decision, in advisory
mode as well.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from tandem.frontend.metrics import FrontendMetrics
from tandem.planner import metrics_names as names
from tandem.planner.interval_stats import Buckets, ServingTotals
from tandem.planner.observation import ROLES, Decision, Observation
from tandem.router.routing import Router

_KINDS = {"Gauge": Gauge, "Counter": Counter, "Info": Info}


def read_totals(metrics: FrontendMetrics, router: Router, now_s: float) -> ServingTotals:
    routed = router.totals
    return ServingTotals(
        time_s=now_s, num_requests=routed.num_requests, num_prompt_tokens=routed.num_prompt_tokens,
        num_cached_prompt_tokens=routed.num_cached_prompt_tokens,
        length_classes=tuple(sorted((key, requests, tokens) for key, (requests, tokens)
                                    in routed.by_length_class.items())),
        num_finished=int(_total(histogram_buckets(metrics.e2e))),
        ttft_buckets=histogram_buckets(metrics.ttft), itl_buckets=histogram_buckets(metrics.itl))


def histogram_buckets(histogram: Histogram) -> Buckets:
    """Cumulative bucket counts summed over every label set, sorted by upper bound."""
    counts: dict[float, float] = {}
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    return tuple(sorted(counts.items()))


def _total(buckets: Buckets) -> float:
    return buckets[-1][1] if buckets else 0.0


class PlannerExporter:
    def __init__(self, registry: CollectorRegistry, is_advisory: bool):
        self.series = {spec.name: _KINDS[spec.kind](spec.name, spec.help, spec.labels,
                                                    registry=registry)
                       for spec in names.ALL_METRICS}
        self.series[names.ADVISORY.name].set(1 if is_advisory else 0)

    def export(self, obs: Observation, decision: Decision) -> None:
        s = self.series
        for role in ROLES:
            s[names.TARGET_WORKERS.name].labels(role).set(decision.target(role))
            s[names.CURRENT_WORKERS.name].labels(role).set(len(obs.pool(role)))
        s[names.DECISIONS_TOTAL.name].labels(decision.kind).inc()
        for action in decision.actions:
            s[names.ACTIONS_TOTAL.name].labels(names.ACTION_LABELS[type(action)]).inc()
        s[names.LAST_DECISION.name].info({"reason": decision.reason, "kind": decision.kind,
                                          "advisory": str(decision.is_advisory).lower()})
        s[names.PREDICTED_RATE.name].set(decision.predicted_rate_per_s)
        rate = obs.request_rate_per_s
        s[names.OBSERVED_RATE.name].set(0.0 if rate is None or math.isnan(rate) else rate)

    def flipped(self, drain_s: float, switch_s: float, total_s: float) -> None:
        flip = self.series[names.FLIP_SECONDS.name]
        for phase, seconds in (("drain", drain_s), ("switch", switch_s), ("total", total_s)):
            flip.labels(phase).set(seconds)

    def failed(self, action: str) -> None:
        self.series[names.FAILED_ACTIONS.name].labels(action).inc()
