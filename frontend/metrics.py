"""Prometheus metrics of the frontend.

Latencies are measured here, where the client sees them, and labelled by the worker that produced
the tokens and its role. Worker-side gauges and counters (running, waiting, KV usage, prefix cache)
come from the latest heartbeat of each worker, through a collector that reads the registry at
scrape time. Names follow vLLM's where the meaning is the same, and every series carries the
`model_name` label as vLLM's do. Per-request figures (token counts, finish reasons, phases) are in
request_metrics; the process's own (CPU, memory, open files) come from prometheus_client.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.frontend.request_metrics import LABELS, ModelLabelled, RequestRecorder
from tandem.router.worker_registry import WorkerRegistry

LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class FrontendMetrics:
    def __init__(self, workers: WorkerRegistry, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        model = workers.model

        def latency(name: str, documentation: str) -> ModelLabelled:
            return ModelLabelled(Histogram(name, documentation, LABELS, buckets=LATENCY_BUCKETS_S,
                                           registry=r), model)

        self.ttft = latency("vllm:time_to_first_token_seconds", "Time to first token")
        self.itl = latency("vllm:inter_token_latency_seconds", "Time between streamed tokens")
        self.e2e = latency("vllm:e2e_request_latency_seconds", "Request latency, end to end")
        self.transfer_bytes = ModelLabelled(Counter(
            "tandem_kv_transfer_bytes", "KV bytes pulled over NIXL", LABELS, registry=r), model)
        self.transfer_seconds = latency("tandem_kv_transfer_seconds", "Duration of one KV pull")
        self.prefill_seconds = latency("tandem_prefill_seconds", "Prefill time on a prefill "
                                       "worker, arrival to first token")
        self.remote_prefill = Counter("tandem_remote_prefill", "Prompts prefilled on a prefill "
                                      "worker", registry=r)
        self.local_prefill = Counter("tandem_local_prefill", "Prompts prefilled on their decode "
                                     "worker", registry=r)
        self.recomputed = Counter("tandem_kv_transfer_fallback", "Remote prefills whose KV pull "
                                  "failed and were recomputed on the decode worker", registry=r)
        self.migrations = Counter("tandem_request_migrations", "Requests sent again to another "
                                  "worker after the one serving them failed, by the failed "
                                  "worker's role", ("role",), registry=r)
        self.requests = RequestRecorder(model, r)
        ProcessCollector(registry=r)
        r.register(_WorkerStatsCollector(workers))


class _WorkerStatsCollector:
    def __init__(self, workers: WorkerRegistry):
        self.workers = workers

    def collect(self):
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests running", labels=LABELS)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting", labels=LABELS)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage, 0 to 1",
                                  labels=LABELS)
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in "
                                      "the prefix cache", labels=LABELS)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix "
                                   "cache", labels=LABELS)
        warm_reads = CounterMetricFamily(
            "tandem_kv_warm_reads", "One-block reads a decode worker made to keep its path to a "
            "prefill worker hot while a pull from it was due", labels=LABELS)
        pinned = GaugeMetricFamily(
            "tandem_kv_pinned_requests", "Prefill worker: finished prefills whose KV blocks are "
            "pinned until a decode worker pulls them (or their lease ends)", labels=LABELS)
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Requests preempted to free KV "
                                          "blocks (and recomputed)", labels=LABELS)
        late = GaugeMetricFamily(
            "tandem_worker_suspect", "1 while a worker's heartbeats are late: routed no new "
            "requests, its requests in flight go on (router/worker_registry.py)", labels=LABELS)
        for w in list(self.workers.workers.values()):
            labels = [self.workers.model, w.worker_id, w.role]
            s = w.stats
            running.add_metric(labels, s.num_running)
            waiting.add_metric(labels, s.num_waiting)
            usage.add_metric(labels, 1.0 - s.num_free_blocks / s.num_blocks if s.num_blocks else 0)
            queries.add_metric(labels, s.prefix_cache_queries)
            hits.add_metric(labels, s.prefix_cache_hits)
            warm_reads.add_metric(labels, s.kv_warm_reads)
            preemptions.add_metric(labels, s.num_preemptions)
            pinned.add_metric(labels, s.num_pinned_requests)
            late.add_metric(labels, float(w.is_suspect))
        yield from (running, waiting, usage, queries, hits, warm_reads, pinned, preemptions, late)
