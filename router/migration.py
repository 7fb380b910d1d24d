"""Request migration: what the frontend does when a worker fails a request it was serving.

As in Dynamo, a request whose worker dies (its call fails as UNAVAILABLE, is cancelled by the peer,
runs past its deadline, or the worker drops out of the registry) is sent again, to another worker,
and the client's stream continues where it was: the retry's prompt is the original prompt plus every
token already streamed, with `max_tokens` reduced by as many and the same sampling parameters, so
greedy output continues exactly (seeded sampling restarts its random stream; a JSON schema's grammar
resumes after the streamed tokens, `num_schema_prompt_tokens`). A prefill worker that
fails makes the request prefill elsewhere, or on its decode worker when no prefill worker is left.
Only when no decode worker is left, or the request has migrated `max_migrations` times, does the
client get an error, and then one that names the role and the failure.

Knob:
- `max_migrations` (default 3): a request that keeps landing on failing workers ends after this many
  retries instead of cycling; two failures in a row already mean a sick pool.

Everything here is pure: status codes arrive as gRPC code names (strings), so the router stays free
of grpc.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tandem.contracts.sampling_params import SamplingParams

# Codes that say the worker, not the request, is at fault: the request may succeed elsewhere.
WORKER_FAULT_CODES = frozenset({
    "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "INTERNAL", "UNKNOWN",
    "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "DATA_LOSS", "LOST"})
# Codes that are evidence the worker process is gone or unreachable, so the registry drops it at
# once (a live worker re-registers on its next heartbeat). "LOST" is the frontend's own code for a
# worker declared dead (its process exited, or no heartbeat for dead_after_s) while the call was in
# flight; a worker only late with its heartbeats keeps its calls (router/worker_registry.py).
WORKER_GONE_CODES = frozenset({"UNAVAILABLE", "LOST"})


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    max_migrations: int = 3

    def __post_init__(self) -> None:
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {self.max_migrations}")


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """One failed worker call of a request."""
    role: str          # prefill | decode
    worker_id: str
    code: str          # gRPC status code name, or LOST
    detail: str = ""

    @property
    def is_worker_fault(self) -> bool:
        return self.code in WORKER_FAULT_CODES

    @property
    def is_worker_gone(self) -> bool:
        return self.code in WORKER_GONE_CODES

    def describe(self) -> str:
        text = f"{self.role} worker {self.worker_id} failed ({self.code}"
        return text + (f": {self.detail})" if self.detail else ")")


@dataclass(frozen=True, slots=True)
class MigrationDecision:
    migrate: bool
    message: str  # why not, for the client, when migrate is False


def decide_migration(failure: WorkerFailure, num_migrations: int, num_decode_left: int,
                     config: MigrationConfig) -> MigrationDecision:
    """Whether to send the request again after `failure`, its `num_migrations`-th so far.

    `num_decode_left`: decode workers that could take the retry. A failed prefill needs none of its
    own role (the decode worker can prefill), so only the decode pool decides.
    """
    if not failure.is_worker_fault:
        return MigrationDecision(False, failure.describe())
    if num_decode_left == 0:
        return MigrationDecision(False, f"no decode worker is left to serve the request: "
                                        f"{failure.describe()}")
    if num_migrations >= config.max_migrations:
        return MigrationDecision(False, f"the request failed on {num_migrations + 1} workers in "
                                        f"a row; last: {failure.describe()}")
    return MigrationDecision(True, "")


def continuation(prompt_token_ids: list[int], streamed_token_ids: list[int],
                 params: SamplingParams) -> tuple[list[int], SamplingParams]:
    """The retry's prompt and sampling parameters: the request as if it had been sent with the
    streamed tokens already in its prompt."""
    num_streamed = len(streamed_token_ids)
    if params.max_tokens is not None and num_streamed >= params.max_tokens:
        raise ValueError(f"all {params.max_tokens} tokens were streamed: nothing to continue")
    max_tokens = None if params.max_tokens is None else params.max_tokens - num_streamed
    min_tokens = max(0, params.min_tokens - num_streamed)
    # A structured request's grammar resumes after the streamed part of the document.
    num_schema = params.num_schema_prompt_tokens + (num_streamed if params.json_schema else 0)
    return (list(prompt_token_ids) + list(streamed_token_ids),
            dataclasses.replace(params, max_tokens=max_tokens, min_tokens=min_tokens,
                                num_schema_prompt_tokens=num_schema))


def attempt_request_id(request_id: str, num_migrations: int) -> str:
    """The id a worker sees for one attempt: a worker that still holds the failed attempt (a
    stopped one that comes back) must not take the retry for a duplicate."""
    return request_id if num_migrations == 0 else f"{request_id}~m{num_migrations}"
