"""A sequence: one request's tokens, its place in the KV cache and its progress.

`num_computed_tokens` counts tokens whose K/V are in the cache; everything after it still has to go
through the model. Prefill, chunked prefill, a prefix-cache hit and a recompute after preemption are
all just different values of that counter.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.contracts.block_hash import hash_block
from tandem.contracts.sampling_params import SamplingParams

if TYPE_CHECKING:  # the sequence stays a pure core: the grammar module needs torch
    from tandem.engine.structured_output import JsonGrammar


class SequenceStatus(enum.Enum):
    WAITING = "waiting"                  # queued to be scheduled (prefill, or recompute)
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"  # decode role: its prompt KV is being pulled
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"              # eos, a stop token or a stop string
    LENGTH = "length"          # max_tokens or the context limit
    ABORT = "abort"            # cancelled by the caller
    REMOTE_DECODE = "remote_decode"  # prefill role: the first token is out, decode happens elsewhere


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt_token_ids: list[int] | tuple[int, ...]  # read only: token_ids is the sequence's copy
    params: SamplingParams
    block_size: int
    arrival_time: float = 0.0          # time.monotonic() when the request reached this engine
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks of token_ids
    num_hashed_blocks_cached: int = 0  # leading blocks already registered with the block manager
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    generator: object | None = None    # the sampler's torch.Generator for a seeded request
    grammar: JsonGrammar | None = None  # where a json_schema request's output stands in its schema
    remote_first_token_id: int | None = None  # decode role: sampled by the prefill worker
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # the start of its first step (queue time's end)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.update_block_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def queue_time_s(self) -> float | None:
        """From arrival until first scheduled (None until then), as vLLM's queue time."""
        if self.first_scheduled_time is None:
            return None
        return max(0.0, self.first_scheduled_time - self.arrival_time)

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def append_token(self, token_id: int) -> None:
        token_ids = self.token_ids
        token_ids.append(token_id)
        if len(token_ids) >= (len(self.block_hashes) + 1) * self.block_size:  # a block filled
            self.update_block_hashes()

    def update_block_hashes(self) -> None:
        """Extend the chained hashes to cover every full block of token_ids."""
        while (len(self.block_hashes) + 1) * self.block_size <= len(self.token_ids):
            start = len(self.block_hashes) * self.block_size
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.append(hash_block(parent, self.token_ids[start:start + self.block_size]))
