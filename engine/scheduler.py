"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption by recompute.

Each step gets a token budget (`max_num_batched_tokens`). Running sequences are served first, in the
order they were admitted: a decoding sequence takes one token, a sequence still in its prompt takes
the next chunk that fits. Waiting sequences are admitted after that, oldest first, while budget,
blocks and `max_num_seqs` allow; on admission the longest cached prefix of the prompt is taken from
the block manager and only the rest is computed.

When a running sequence needs a block and none is free, the most recently admitted running sequence
is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed from
its tokens (its prefix-cached blocks usually make that cheap).

The scheduler is pure: it decides, the model runner computes, and `postprocess` records the results.
The role decides what happens once a token is sampled: `Scheduler` keeps decoding, while
`PrefillScheduler` (engine/role_schedulers.py) finishes the sequence after its first token and
keeps its blocks pinned for a decode worker to pull.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tandem.engine.block_manager import BlockManager
from tandem.engine.sequence import FinishReason, Sequence, SequenceStatus
from tandem.engine.stop_rule import finish_after_token, stop_reason_of

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence computes this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches the end of its tokens this step, and so samples one."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


@dataclass(slots=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True


class Scheduler:
    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager,
                 eos_token_ids: set[int]):
        self.limits = limits
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Decode role only (DecodeScheduler.add_remote): parked until their prompt's KV is pulled.
        self.waiting_for_remote_kvs: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0     # of which were found there

    # ---- public API --------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens >= self.limits.max_model_len:
            raise ValueError(
                f"prompt has {seq.num_tokens} tokens; the model's context is "
                f"{self.limits.max_model_len} tokens and at least one must be left to generate")
        num_blocks = seq.num_blocks_for(seq.num_tokens + 1)
        if num_blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt has {seq.num_tokens} tokens and needs {num_blocks} KV blocks; "
                f"the KV cache has {self.block_manager.num_blocks}")
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Start a sequence as if its first `num_computed_tokens` had been prefilled here (their
        blocks are allocated, holding whatever the cache held): `tandem profile` times steps at
        any point of a request this way. Raises ValueError when the blocks cannot be had."""
        num_blocks = seq.num_blocks_for(num_computed_tokens)
        if not self.block_manager.can_allocate(num_blocks):
            raise ValueError(f"no room for {num_computed_tokens} tokens in the KV cache")
        seq.block_table = self.block_manager.allocate(num_blocks)
        seq.num_computed_tokens = num_computed_tokens
        # The placed prefix counts as registered already, as it would be after a real prefill.
        seq.num_hashed_blocks_cached = min(num_computed_tokens // seq.block_size,
                                           len(seq.block_hashes))
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def num_pinned_requests(self) -> int:
        """Prefill role: finished requests whose blocks await a pull (0 in other roles)."""
        return 0

    def pinned_blocks(self, request_id: str) -> list[int] | None:
        """Prefill role: the blocks holding a finished request's prompt KV, until released."""
        return None

    def release_pinned(self, request_id: str) -> bool:
        """Prefill role: free a finished request's pinned blocks; False when none are pinned."""
        return False

    def pinned_request_ids(self) -> list[str]:
        """Prefill role: the requests whose blocks are pinned now."""
        return []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def has_prompt_work(self) -> bool:
        """Whether prompt tokens wait to be computed: a waiting request, or a running one whose
        prompt is not all computed yet (the next chunk of a long prompt)."""
        return bool(self.waiting) or any(seq.num_computed_tokens < seq.num_prompt_tokens
                                         for seq in self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.limits.max_num_batched_tokens
        budget, preempted = self._schedule_running(batch, budget)
        if not preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[Sequence]:
        """Record one step's results; returns the sequences that got a token this step."""
        advanced = []
        for i, seq in enumerate(batch.seqs):
            if seq.is_finished:  # ended while its step was in flight: its token is dropped
                continue
            seq.num_computed_tokens += batch.num_new_tokens[i]
            token_id = sampled[i]
            if token_id is not None:
                seq.append_token(token_id)
                advanced.append(seq)
            self._cache_computed_blocks(seq)
            if token_id is not None:
                self._check_stop(seq, token_id)
        return advanced

    def advance_decode(self, max_steps: int,
                       next_token_ids: Callable[[Sequence, int], list[int]]) -> int:
        """Run up to `max_steps` steps of a pure decode batch at once; returns the steps run.

        Does exactly what as many rounds of `schedule` and `postprocess` would: the same tokens,
        block ids, prefix-cache events in the same order, and the same finishes, stopping after
        the first step at which a sequence finishes. `next_token_ids(seq, n)` gives the n tokens
        seq samples in the next n steps, one per step. Returns 0, doing nothing, unless every
        running sequence is decoding, nothing waits, all fit one step's budget and the free
        blocks cover every block the steps take (so that no step can preempt).

        Why: a simulator knows a stretch of identical decode steps in advance, and doing its
        work per block instead of per token is what makes an hour-long trace simulate in seconds.
        """
        if max_steps < 1 or not self._is_pure_decode():
            return 0
        running = list(self.running)
        tokens = [next_token_ids(seq, max_steps) for seq in running]
        num_steps = min(self._steps_until_finish(seq, seq_tokens)
                        for seq, seq_tokens in zip(running, tokens))
        num_needed = sum(max(0, seq.num_blocks_for(seq.num_tokens + num_steps - 1)
                             - len(seq.block_table)) for seq in running)
        if num_needed > self.block_manager.num_free_blocks:
            return 0
        block_work = sorted(work for i, seq in enumerate(running)
                            for work in _decode_block_work(seq, i, num_steps))
        for seq, seq_tokens in zip(running, tokens):
            seq.token_ids.extend(seq_tokens[:num_steps])
            seq.update_block_hashes()
        self._run_block_work(running, block_work)
        for seq, seq_tokens in zip(running, tokens):
            seq.num_computed_tokens = seq.num_tokens - 1
            self._check_stop(seq, seq_tokens[num_steps - 1])
        return num_steps

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None
               ) -> None:
        """End a sequence (stop condition, stop string or abort) and release what it holds."""
        if seq.is_finished:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self._dequeue(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self._release(seq)

    # ---- role hooks --------------------------------------------------------------------------

    def _after_token(self, seq: Sequence, token_id: int) -> FinishReason | None:
        """The finish reason a freshly sampled token implies, if any."""
        return finish_after_token(seq.params, token_id, seq.num_output_tokens, seq.num_tokens,
                                  self.eos_token_ids, self.limits.max_model_len)

    def _dequeue(self, seq: Sequence) -> None:
        """Take a finishing sequence out of any queue a role keeps besides waiting and running."""

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        seq.block_table = []

    # ---- helpers -----------------------------------------------------------------------------

    def _check_stop(self, seq: Sequence, token_id: int) -> None:
        reason = self._after_token(seq, token_id)
        if reason is not None:
            self.finish(seq, reason, stop_reason_of(reason, seq.params, token_id))

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> tuple[int, bool]:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._reserve_slots(seq, num_new):
                preempted = True
                if seq not in self.running:  # it was the victim itself
                    break
                continue  # a later sequence made room; try this one again
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        return budget, preempted

    def _reserve_slots(self, seq: Sequence, num_new: int) -> bool:
        """Allocate blocks for num_new more tokens, preempting the newest sequence if needed."""
        num_needed = seq.num_blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table)
        if num_needed <= 0:  # most decode steps: the last block still has room
            return True
        if self.block_manager.can_allocate(num_needed):
            seq.block_table.extend(self.block_manager.allocate(num_needed))
            return True
        if self.running == [seq]:
            # Alone and still out of blocks: the whole cache is too small for it. Recomputing would
            # hit the same wall, so it ends here.
            logger.warning("request %s filled the whole KV cache (%d blocks); finishing it",
                           seq.request_id, self.block_manager.num_blocks)
            self.finish(seq, FinishReason.LENGTH)
            return False
        self._preempt(self.running[-1])
        return False

    def _preempt(self, seq: Sequence) -> None:
        logger.info("preempting request %s (%d tokens) to free KV blocks",
                    seq.request_id, seq.num_tokens)
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks_cached = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            cached = self._cached_prefix(seq)
            num_computed = len(cached) * seq.block_size
            num_new = min(seq.num_tokens - num_computed, budget)
            if not self.limits.enable_chunked_prefill and num_new < seq.num_tokens - num_computed:
                break
            num_needed = seq.num_blocks_for(num_computed + num_new) - len(cached)
            if not self.block_manager.can_allocate(num_needed, reusing=cached):
                break
            self.waiting.popleft()
            self.block_manager.acquire(cached)
            seq.block_table = cached + self.block_manager.allocate(num_needed)
            seq.num_computed_tokens = num_computed
            seq.num_hashed_blocks_cached = len(cached)
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = num_computed
                self.prefix_cache_queries += seq.num_prompt_tokens
                self.prefix_cache_hits += num_computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        cached = self.block_manager.match_prefix(seq.block_hashes)
        if len(cached) * seq.block_size >= seq.num_tokens:
            cached = cached[:-1]  # compute at least the last token, to have logits to sample from
        return cached

    def _is_pure_decode(self) -> bool:
        """Whether the next step schedules every running sequence for one decode token."""
        return (not self.waiting and 0 < len(self.running) <= self.limits.max_num_batched_tokens
                and all(seq.num_computed_tokens == seq.num_tokens - 1
                        and seq.num_computed_tokens >= seq.num_prompt_tokens
                        for seq in self.running))

    def _steps_until_finish(self, seq: Sequence, tokens: list[int]) -> int:
        """The step (from 1) whose token ends seq, or len(tokens) when none does.

        The stop rule is asked only where it can answer yes: at a stop or eos token, and where the
        output or the context reaches its length limit (both counts grow by one a step).
        """
        params = seq.params
        num_output, num_tokens = seq.num_output_tokens, seq.num_tokens
        candidates = [self.limits.max_model_len - num_tokens - 1]
        if params.max_tokens is not None:
            candidates.append(params.max_tokens - num_output - 1)
        stop_ids = self.eos_token_ids.union(params.stop_token_ids)
        if stop_ids:
            candidates.extend(j for j, token_id in enumerate(tokens) if token_id in stop_ids)
        for j in sorted({max(0, c) for c in candidates if c < len(tokens)}):
            reason = self._after_token_at(seq, tokens[j], num_output + j + 1, num_tokens + j + 1)
            if reason is not None:
                return j + 1
        return len(tokens)

    def _after_token_at(self, seq: Sequence, token_id: int, num_output_tokens: int,
                        num_tokens: int) -> FinishReason | None:
        """`_after_token` for a token sampled later, given the counts that include it."""
        return finish_after_token(seq.params, token_id, num_output_tokens, num_tokens,
                                  self.eos_token_ids, self.limits.max_model_len)

    def _run_block_work(self, running: list[Sequence],
                        block_work: list[tuple[int, int, int, int]]) -> None:
        """Allocate and cache blocks in the order the steps would: by step, allocations (schedule)
        before caching (postprocess), sequences in running order within each."""
        manager = self.block_manager
        for _, phase, i, amount in block_work:
            seq = running[i]
            if phase == 0:
                seq.block_table.extend(manager.allocate(amount))
                continue
            start = seq.num_hashed_blocks_cached
            if amount > start:
                parent = seq.block_hashes[start - 1] if start else None
                manager.cache_blocks(seq.block_table[start:amount],
                                     seq.block_hashes[start:amount], parent)
                seq.num_hashed_blocks_cached = amount

    def _cache_computed_blocks(self, seq: Sequence) -> None:
        num_full = min(seq.num_computed_tokens // seq.block_size, len(seq.block_hashes))
        start = seq.num_hashed_blocks_cached
        if num_full <= start:
            return
        parent = seq.block_hashes[start - 1] if start else None
        self.block_manager.cache_blocks(
            seq.block_table[start:num_full], seq.block_hashes[start:num_full], parent)
        seq.num_hashed_blocks_cached = num_full


def _decode_block_work(seq: Sequence, index: int, num_steps: int
                       ) -> list[tuple[int, int, int, int]]:
    """(step, phase, index, amount) for each block operation of seq's next num_steps decode steps.

    Step s (from 1) schedules seq with n = num_tokens + s - 1 tokens in KV after it: phase 0
    allocates what its table lacks for n tokens (amount: blocks); phase 1, after the token,
    caches the blocks that n computed tokens fill (amount: the end of the cached blocks).
    """
    block_size = seq.block_size
    n0, table_len = seq.num_tokens, len(seq.block_table)
    work = []
    first_need = seq.num_blocks_for(n0) - table_len
    if first_need > 0:
        work.append((1, 0, index, first_need))
    covered = max(table_len, seq.num_blocks_for(n0)) * block_size
    # A new block each time n passes a multiple of the block size.
    work.extend((s, 0, index, 1) for s in range(covered + 2 - n0, num_steps + 1, block_size))
    work.append((1, 1, index, min(n0 // block_size, len(seq.block_hashes))))
    first_full = (n0 // block_size + 1) * block_size - n0 + 1
    work.extend((s, 1, index, (n0 + s - 1) // block_size)
                for s in range(first_full, num_steps + 1, block_size))
    return work
