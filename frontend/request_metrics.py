"""Per-request figures in vLLM's names: token counts, finish reasons, and the phases of a request.

The pipeline calls `RequestRecorder.on_finished` once per request that finished (stop or length, as
it emits the last chunk). Each series carries `model_name`, as vLLM's do, with `worker` and `role`:
prompt-side figures (prompt tokens, queue and prefill time) are labelled by the worker that made the
first token (a prefill worker, or the decode worker when it prefilled locally), the rest by the
decode worker.

The phases (`started_s` is when the pipeline took the request):
- queue time: as vLLM's, from the request's arrival at the engine that made its first token (a
  prefill worker, or the decode worker that prefilled it) until that engine first scheduled it;
  the worker measures it and sends it with the first token (PrefillResponse / TokenChunk
  `queue_seconds`). The frontend itself does not queue: admission refuses instead.
- prefill time: the time to first token, as the frontend sees it, less the queue time;
  decode time: first token to last; time per output token: decode time over the tokens after the
  first.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from tandem.frontend.access_log import note_request_id

logger = logging.getLogger(__name__)

LABELS = ("model_name", "worker", "role")
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000)
PHASE_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                  0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class RequestProgress(Protocol):
    """What the recorder reads of a finished request (the pipeline's stream state)."""
    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    started_s: float
    first_token_s: float | None
    last_token_s: float | None
    first_worker: tuple[str, str] | None
    decode_worker: str
    queue_s: float | None               # reported by the first token's worker


class ModelLabelled:
    """A labelled metric whose `labels(worker, role)` fills in the model name first, so that the
    pipeline's calls stay as they are; everything else is the metric's."""

    def __init__(self, metric: Any, model_name: str):
        self.metric = metric
        self.model_name = model_name

    def labels(self, *values: str) -> Any:
        return self.metric.labels(self.model_name, *values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)


class RequestRecorder:
    def __init__(self, model_name: str, registry: CollectorRegistry):
        self.model_name = model_name
        r = registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", LABELS,
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", LABELS,
                                         registry=r)
        self.success = Counter("vllm:request_success", "Requests that finished, by reason",
                               (*LABELS, "finished_reason"), registry=r)
        self.prompt_hist = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request",
                                     LABELS, buckets=TOKEN_BUCKETS, registry=r)
        self.generation_hist = Histogram("vllm:request_generation_tokens", "Generated tokens per "
                                         "request", LABELS, buckets=TOKEN_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time from arrival at the "
                               "worker until it first scheduled the request", LABELS,
                               buckets=PHASE_BUCKETS_S, registry=r)
        self.prefill = Histogram("vllm:request_prefill_time_seconds", "Time to first token less "
                                 "the queue time", LABELS, buckets=PHASE_BUCKETS_S, registry=r)
        self.decode = Histogram("vllm:request_decode_time_seconds", "Time from the first token "
                                "to the last", LABELS, buckets=PHASE_BUCKETS_S, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Decode time per output "
                              "token after the first, per request", LABELS,
                              buckets=TPOT_BUCKETS_S, registry=r)
        # Tokens by worker since the start, read by the periodic stats line.
        self.tokens_by_worker: dict[tuple[str, str], list[int]] = {}

    def on_finished(self, progress: RequestProgress, finish_reason: str) -> None:
        first = (self.model_name, *(progress.first_worker or (progress.decode_worker, "decode")))
        decode = (self.model_name, progress.decode_worker, "decode")
        first_token_s = progress.first_token_s or progress.started_s
        last_token_s = progress.last_token_s or first_token_s
        ttft_s = first_token_s - progress.started_s
        queue_s = min(max(0.0, progress.queue_s or 0.0), max(0.0, ttft_s))
        num_output = progress.num_output_tokens
        self.prompt_tokens.labels(*first).inc(progress.num_prompt_tokens)
        self.prompt_hist.labels(*first).observe(progress.num_prompt_tokens)
        self.queue.labels(*first).observe(queue_s)
        self.prefill.labels(*first).observe(max(0.0, ttft_s - queue_s))
        self.generation_tokens.labels(*decode).inc(num_output)
        self.generation_hist.labels(*decode).observe(num_output)
        self.decode.labels(*decode).observe(last_token_s - first_token_s)
        if num_output > 1:
            self.tpot.labels(*decode).observe((last_token_s - first_token_s) / (num_output - 1))
        self.success.labels(*decode, finish_reason).inc()
        self._count(first[1:], progress.num_prompt_tokens, 0)
        self._count(decode[1:], 0, num_output)
        note_request_id(progress.request_id)
        # DEBUG: the access log (HTTP) already has a line per request at INFO.
        logger.debug("request %s finished (%s): %d prompt tokens (%d cached), %d generated, "
                    "TTFT %.3f s, e2e %.3f s", progress.request_id, finish_reason,
                    progress.num_prompt_tokens, progress.num_cached_tokens, num_output,
                    first_token_s - progress.started_s, last_token_s - progress.started_s)

    def _count(self, worker: tuple[str, str], num_prompt: int, num_generated: int) -> None:
        counts = self.tokens_by_worker.setdefault(worker, [0, 0])
        counts[0] += num_prompt
        counts[1] += num_generated
