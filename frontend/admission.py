"""Admission control: refuse new requests while the server already holds as much as it should.

Without a bound every request is accepted and queued: at 512 concurrent clients on a CPU the slowest
first byte took 15.6 s, and each queued request holds memory in the frontend and KV blocks on a
worker. Refusing early with a 503 and `Retry-After` lets a client (or a load balancer) go elsewhere
or back off, and keeps the frontend itself responsive: health and metrics never queue behind work.
This is TGI's `--max-concurrent-requests`, plus a bound on prompt tokens not yet prefilled.

Two limits, each 0 for "no limit":

- `max_concurrent_requests` (256): requests admitted and not finished, waiting and running alike.
  TGI's default is 128; tandem's decode workers batch up to 256 sequences each, so one worker's
  batch queues no further than this.
- `max_queued_prompt_tokens` (262,144): prompt tokens of admitted requests that have not produced
  their first token yet, i.e. the prefill backlog. At the ~30,000 prefill tokens/s of an 8B model
  on one H200 that is ~9 s of backlog, past any time-to-first-token target, so a request that would
  join it is better refused. One request larger than the limit is still admitted when nothing is
  queued: otherwise it could never be served.

`retry_after_s` (1) is what `Retry-After` says. `AdmissionBook` is the pure accounting;
`AdmissionGate` wraps a request pipeline with it: a request is admitted when its stream starts, its
prompt tokens leave the backlog at its first token, and it leaves the book when its stream ends,
however it ends. The APIs may also ask `is_full` before reading a body, to refuse cheaply.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tandem.frontend.types import GenerateChunk, GenerateRequest, RequestPipeline, RequestRejected

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_concurrent_requests: int = 256      # 0: no limit
    max_queued_prompt_tokens: int = 262_144  # 0: no limit
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_concurrent_requests", "max_queued_prompt_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no limit) or positive, got {getattr(self, name)}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be non-negative, got {self.retry_after_s}")


class Overloaded(RequestRejected):
    """A request refused because the server is full; clients should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, 503, "server_overloaded")
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class AdmissionBook:
    """Which requests are admitted, and how many prompt tokens still wait for their prefill."""
    config: AdmissionConfig
    queued_tokens: dict[str, int] = field(default_factory=dict)  # request id -> prompt tokens
    num_requests: int = 0
    num_queued_tokens: int = 0
    num_refused: int = 0

    @property
    def is_full(self) -> bool:
        limit = self.config.max_concurrent_requests
        return bool(limit) and self.num_requests >= limit

    def refusal(self, num_prompt_tokens: int) -> str | None:
        """Why a request of this many prompt tokens cannot be admitted now, or None."""
        config = self.config
        if self.is_full:
            return (f"the server is at its limit of {config.max_concurrent_requests} concurrent "
                    f"requests; retry after {config.retry_after_s} s")
        limit = config.max_queued_prompt_tokens
        if limit and self.num_queued_tokens and self.num_queued_tokens + num_prompt_tokens > limit:
            return (f"the server's prefill backlog is {self.num_queued_tokens} prompt tokens; with "
                    f"this request's {num_prompt_tokens} it would pass its limit of {limit}; "
                    f"retry after {config.retry_after_s} s")
        return None

    def admit(self, request_id: str, num_prompt_tokens: int) -> str | None:
        """Admit the request and return None, or return why not (and admit nothing)."""
        reason = self.refusal(num_prompt_tokens)
        if reason is not None:
            self.num_refused += 1
            return reason
        self.num_requests += 1
        self.queued_tokens[request_id] = num_prompt_tokens
        self.num_queued_tokens += num_prompt_tokens
        return None

    def on_first_token(self, request_id: str) -> None:
        self.num_queued_tokens -= self.queued_tokens.pop(request_id, 0)

    def on_finished(self, request_id: str) -> None:
        self.on_first_token(request_id)
        self.num_requests -= 1


class AdmissionGate:
    """A `RequestPipeline` that admits requests through an `AdmissionBook` before `pipeline` sees
    them; everything else is the wrapped pipeline's."""

    def __init__(self, pipeline: RequestPipeline, config: AdmissionConfig):
        self.pipeline = pipeline
        self.book = AdmissionBook(config)
        self.model_name = pipeline.model_name
        self.max_model_len = pipeline.max_model_len

    @property
    def is_ready(self) -> bool:
        return self.pipeline.is_ready

    @property
    def is_draining(self) -> bool:
        return self.pipeline.is_draining

    @property
    def not_ready_reason(self) -> str:
        return self.pipeline.not_ready_reason

    @property
    def is_full(self) -> bool:
        return self.book.is_full

    def overloaded(self) -> Overloaded:
        reason = self.book.refusal(0) or "the server is at its request limit"
        return Overloaded(reason, self.book.config.retry_after_s)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        # Admission happens inside the generator, so a stream that never starts holds no place.
        request_id = request.request_id
        reason = self.book.admit(request_id, len(request.prompt_token_ids))
        if reason is not None:
            logger.info("request %s refused: %s", request_id, reason)
            raise Overloaded(reason, self.book.config.retry_after_s)
        stream = self.pipeline.generate(request)
        try:
            async for chunk in stream:
                if chunk.token_ids:
                    self.book.on_first_token(request_id)
                yield chunk
        finally:
            self.book.on_finished(request_id)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
