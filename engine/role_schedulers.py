"""The schedulers of the disaggregated roles, and the choice among them.

`PrefillScheduler` ends a sequence at its first token and keeps its blocks pinned until a decode
worker has pulled them; `DecodeScheduler` also takes requests whose prompt KV is pulled from a
prefill worker. Both are `Scheduler` (engine/scheduler.py) with the role's rules on top, and pure
like it.
"""

from __future__ import annotations

from tandem.engine.block_manager import BlockManager
from tandem.engine.scheduler import Scheduler, SchedulerLimits
from tandem.engine.sequence import FinishReason, Sequence, SequenceStatus


class PrefillScheduler(Scheduler):
    """Prefill role: a sequence ends at its first token and its blocks stay pinned.

    The blocks are released by `release_pinned` once a decode worker has pulled them, or when their
    lease expires.
    """

    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager,
                 eos_token_ids: set[int]):
        super().__init__(limits, block_manager, eos_token_ids)
        self.pinned: dict[str, list[int]] = {}

    def _after_token(self, seq: Sequence, token_id: int) -> FinishReason | None:
        return FinishReason.REMOTE_DECODE

    def _steps_until_finish(self, seq: Sequence, tokens: list[int]) -> int:
        return 1  # every sequence ends at its first token

    def _release(self, seq: Sequence) -> None:
        if seq.finish_reason == FinishReason.REMOTE_DECODE:
            self.pinned[seq.request_id] = seq.block_table
        else:
            self.block_manager.free(seq.block_table)
        seq.block_table = []

    @property
    def num_pinned_requests(self) -> int:
        return len(self.pinned)

    def pinned_blocks(self, request_id: str) -> list[int] | None:
        return self.pinned.get(request_id)

    def pinned_request_ids(self) -> list[str]:
        return list(self.pinned)

    def release_pinned(self, request_id: str) -> bool:
        block_ids = self.pinned.pop(request_id, None)
        if block_ids is None:
            return False
        self.block_manager.free(block_ids)
        return True


class DecodeScheduler(Scheduler):
    """Decode role: besides local prefill, takes requests whose prompt KV lives on a prefill worker.

    `add_remote` allocates blocks for the part of the prompt this worker's prefix cache lacks and
    parks the sequence in its own queue, status `WAITING_FOR_REMOTE_KVS`, until the pull finishes;
    `complete_remote` then starts it decoding from the first token the prefill worker sampled, or,
    when the pull failed, queues it for a local recompute of the prompt. Either way the parked
    blocks are accounted for.
    """

    def add_remote(self, seq: Sequence, first_token_id: int) -> tuple[int, list[int]] | None:
        """(number of leading prompt blocks cached here, local blocks to pull the rest into).

        None when the blocks cannot be had now: the sequence is then queued to recompute its prompt
        here, as after a failed pull.
        """
        self.add(seq)  # validates lengths
        self.waiting.remove(seq)
        seq.status = SequenceStatus.WAITING_FOR_REMOTE_KVS
        seq.remote_first_token_id = first_token_id
        self.waiting_for_remote_kvs[seq.request_id] = seq
        num_prompt_blocks = seq.num_blocks_for(seq.num_prompt_tokens)
        cached = self.block_manager.match_prefix(seq.block_hashes)[:num_prompt_blocks]
        num_needed = num_prompt_blocks - len(cached)
        if not self.block_manager.can_allocate(num_needed, reusing=cached):
            self.complete_remote(seq.request_id, succeeded=False)
            return None
        self.block_manager.acquire(cached)
        new_blocks = self.block_manager.allocate(num_needed)
        seq.block_table = cached + new_blocks
        seq.num_hashed_blocks_cached = len(cached)
        seq.num_cached_prompt_tokens = min(len(cached) * seq.block_size, seq.num_prompt_tokens)
        self.prefix_cache_queries += seq.num_prompt_tokens
        self.prefix_cache_hits += seq.num_cached_prompt_tokens
        return len(cached), new_blocks

    def complete_remote(self, request_id: str, succeeded: bool) -> None:
        seq = self.waiting_for_remote_kvs.pop(request_id)
        first_token_id = seq.remote_first_token_id
        seq.remote_first_token_id = None
        if succeeded:
            seq.num_computed_tokens = seq.num_prompt_tokens
            self._cache_computed_blocks(seq)
            seq.status = SequenceStatus.RUNNING
            seq.append_token(first_token_id)
            # Ahead of any sequence still computing its prompt here: `schedule` serves the running
            # sequences in order, so a long prompt prefilled locally ahead of this one would take
            # each step's budget until its last chunk (a second and more for 20k tokens), while
            # this one needs a single token a step.
            self.running.insert(next((i for i, other in enumerate(self.running)
                                      if other.num_uncomputed_tokens > 1), len(self.running)), seq)
            self._check_stop(seq, first_token_id)
            return
        # The pulled blocks may hold anything: drop them, keep only what was cached here before.
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        seq.num_hashed_blocks_cached = 0
        seq.num_cached_prompt_tokens = 0
        seq.append_token(first_token_id)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def _dequeue(self, seq: Sequence) -> None:
        if seq.status == SequenceStatus.WAITING_FOR_REMOTE_KVS:
            del self.waiting_for_remote_kvs[seq.request_id]


def make_scheduler(role: str, limits: SchedulerLimits, block_manager: BlockManager,
                   eos_token_ids: set[int]) -> Scheduler:
    """The role picks the policy once, here (DESIGN.md, "Roles")."""
    if role == "prefill":
        return PrefillScheduler(limits, block_manager, eos_token_ids)
    if role == "decode":
        return DecodeScheduler(limits, block_manager, eos_token_ids)
    return Scheduler(limits, block_manager, eos_token_ids)
