"""What the frontend's APIs hand to the request pipeline, and what they get back.

Both the OpenAI HTTP API and the public gRPC API turn a client request into a `GenerateRequest` and
stream `GenerateChunk`s out of `RequestPipeline.generate`; the pipeline does the routing, the worker
calls and the detokenization.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from tandem.contracts.outputs import Logprob
from tandem.contracts.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt_text: str | None = None


@dataclass(slots=True)
class GenerateChunk:
    """One step of a request's output: new token ids and the text that is safe to show."""
    token_ids: list[int]
    text: str
    finish_reason: str | None = None     # stop | length | abort, on the last chunk only
    stop_reason: str | int | None = None
    logprobs: list[Logprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0           # prompt tokens served from a prefix cache


class RequestRejected(Exception):
    """The request cannot be served as asked; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class RequestPipeline(Protocol):
    model_name: str
    max_model_len: int

    @property
    def is_ready(self) -> bool: ...

    @property
    def is_draining(self) -> bool: ...

    @property
    def not_ready_reason(self) -> str:
        """Why the pipeline is not ready ("decode pool has 0 of 1 workers ready; ..."), or ""."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Streams the request's output; closing the iterator early aborts the request."""
        ...
