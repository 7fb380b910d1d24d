"""One simulated worker: tandem's real scheduler over its real block manager, timed by the model.

A worker is what `engine/async_engine.py` makes of an engine: a loop of steps (schedule, run,
postprocess) with operations from outside (add a request, park a remote one, complete a pull,
release pinned blocks) applied between two steps, never during one. Here the "run" is a duration
from the performance model instead of a forward pass, and the sampled token is synthetic.

Step time. A batch is split the way the profile measured it: decode rows (one token after a prompt
that is already in KV) and prefill rows (a prompt chunk, or a recompute after preemption). The
batch's prefill tokens go to the model with the token-weighted mean of the prefix each row already
has in KV, which keeps the attention term (sum of new x cached) of a batch of several chunks.

Collapsed decode steps. When a batch is pure decode, nothing waits to be admitted and every
running sequence is in it, the next steps are the same batch again until the first sequence
reaches its length, unless an operation arrives. If the free blocks cover every block those steps
will allocate (so no preemption can happen), the worker plans them as one stretch: their end times
come from the model (the context grows by one token per sequence per step), one event is queued at
the last end, and an operation delivered in between cuts the stretch at the step in flight. The
steps themselves are still run through the real scheduler one by one when the stretch ends, so
the schedule, block ids and token times are exactly those of step-by-step simulation. What moves is
when the router hears of it: KV events of output blocks and the block count a heartbeat reads are
those of the stretch's start until it ends (output blocks are never part of another prompt's
prefix in these workloads, except for identical prompts).

Serving. A serving worker (engine/async_engine.py over LLMEngine.steps) differs from the bare
engine step the profile times in three ways the worker models. A steady decode batch (every
running sequence decodes, nothing waits) has its next step queued on the device before the
operations that arrived during this step are applied (engine/lookahead.py), so a sequence they
bring into the batch joins one step later; the loop applies them while that step runs, so they
are in the scheduler when it ends (an operation that only parks a handed-over request and starts
its pull takes effect at the boundary: `ops_now`; while a request is parked for its pull, no step
is queued ahead, so the pulled request joins the step after the boundary its pull ends before).
With prompt tokens left to compute after a step that decoded, a worker queues its next step before
it hands back this step's tokens (LLMEngine.steps), so they leave `prompt_launch_s` after the step
ends (`handoff_s`); a step that carries a prompt chunk pays `prefill_token_overhead_s` for each
prompt token in it beyond the profile's step (and not `token_overhead_s`, which decode-only steps
pay for each token they sample: the step logs show no cost a sampled token in a step with a
chunk), `extra_prompt_overhead_s` for each prompt past its first and, where it was not so
queued and the step before it sampled (the engine waited for it), `chunk_overhead_s`:
the loop's hand-back of the step before (its token relay, the operations it applies) then comes
first, with the device idle. A prefill worker answers a finished prompt as its step ends. (The
serving path before answered at the worker's next step boundary: at once when it went idle, when
the next step ended if that step sampled, and `chunk_launch_s` into it if it was a chunk that did
not; `answer_at_step_boundary` replays that, for runs made then.)

Synthetic tokens. The trace holds no output text, so the token sampled at position p is a fixed
function of p: requests are run with `ignore_eos` and `max_tokens` set to their output length, so
lengths match the workload, and two identical prompts produce identical outputs, as greedy decoding
does, which keeps the prefix cache honest about output blocks.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable
from itertools import accumulate

from tandem.contracts.worker_stats import WorkerStats
from tandem.engine.block_manager import BlockManager
from tandem.engine.lookahead import queues_before_hand_back
from tandem.engine.role_schedulers import make_scheduler
from tandem.engine.scheduler import ScheduledBatch, SchedulerLimits
from tandem.engine.sequence import Sequence
from tandem.engine.step_log import step_terms
from tandem.planner.sim_config import SimConfig
from tandem.router.worker_registry import WorkerState

logger = logging.getLogger(__name__)

FIRST_ORDINARY_TOKEN_ID = 16  # lower ids are special tokens in tandem's random models
TOKEN_MULTIPLIER = 2654435761  # Knuth's multiplicative hash: spreads positions over the vocabulary


def synthetic_token_id(num_tokens: int, vocab_size: int) -> int:
    """The token sampled after `num_tokens` tokens (the module docstring says why a fixed one)."""
    return FIRST_ORDINARY_TOKEN_ID + (num_tokens * TOKEN_MULTIPLIER) % (
        vocab_size - FIRST_ORDINARY_TOKEN_ID)


def synthetic_token_cycle(vocab_size: int) -> list[int]:
    """synthetic_token_id(n) at n = 0, 1, ... for two periods: it depends on n only modulo
    `vocab_size - FIRST_ORDINARY_TOKEN_ID`, so any run of up to a period is one slice."""
    span = vocab_size - FIRST_ORDINARY_TOKEN_ID
    cycle = [synthetic_token_id(n, vocab_size) for n in range(span)]
    return cycle + cycle


class SimWorker:
    """A worker's engine state plus the step in flight, if any."""

    __slots__ = ("worker_id", "role", "block_manager", "scheduler", "state", "model", "step_budget",
                 "batch", "step_end_s", "ops", "num_steps", "busy_s", "_token_span", "_token_cycle",
                 "collapse", "stretch_ends_s", "generation", "step_overhead_s",
                 "token_overhead_s", "chunk_overhead_s", "prefill_token_overhead_s",
                 "extra_prompt_overhead_s",
                 "chunk_launch_s", "prompt_launch_s", "queue_prompts_early",
                 "answer_at_step_boundary",
                 "lookahead", "ops_now",
                 "_batch_is_decode", "_steady", "_queued_early", "_overlapped", "_deferred_ops",
                 "step_log",
                 "_logging")

    def __init__(self, worker_id: str, role: str, config: SimConfig, model,
                 state: WorkerState):
        self.worker_id = worker_id
        self.role = role
        engine = config.engine
        self.block_manager = BlockManager(config.num_kv_blocks, engine.block_size,
                                          engine.enable_prefix_caching)
        limits = SchedulerLimits(engine.max_num_seqs, engine.max_num_batched_tokens,
                                 config.max_model_len, engine.enable_chunked_prefill)
        # ignore_eos is set on every request: the stop rule never looks at the eos set.
        self.scheduler = make_scheduler(role, limits, self.block_manager, set())
        self.state = state
        self.model = model
        self.step_budget = engine.max_num_batched_tokens  # prices steps at their graph bucket
        self.batch: ScheduledBatch | None = None
        self.step_end_s: float | None = None  # None: idle, waiting for an operation
        self.ops: list[Callable[[], None]] = []
        self.ops_now: list[Callable[[], None]] = []  # applied at the boundary even when deferring
        self.num_steps = 0
        self.busy_s = 0.0
        self._token_span = config.token_vocab_size - FIRST_ORDINARY_TOKEN_ID
        self._token_cycle = synthetic_token_cycle(config.token_vocab_size)
        self.collapse = config.collapse_decode_steps
        self.stretch_ends_s: list[float] | None = None  # end times of a planned decode stretch
        self.generation = 0  # bumped whenever the step end event is replaced
        self.step_overhead_s = config.step_overhead_s
        self.token_overhead_s = config.token_overhead_s
        self.chunk_overhead_s = config.chunk_overhead_s
        self.extra_prompt_overhead_s = config.extra_prompt_overhead_s
        self.prefill_token_overhead_s = config.prefill_token_overhead_s
        self.chunk_launch_s = config.chunk_launch_s
        self.prompt_launch_s = config.prompt_launch_s
        self.queue_prompts_early = config.queue_prompts_early
        self.answer_at_step_boundary = config.answer_at_step_boundary
        self.lookahead = config.decode_lookahead
        self._batch_is_decode = False  # the step in flight has decode rows only
        self._steady = False  # the last step was steady decode: the engine queued the next one
        # The last step decoded with prompt tokens left: the engine queues the next step before
        # it hands back the tokens and applies the operations (queues_before_hand_back)
        self._queued_early = False
        self._overlapped = False
        # Operations that wait for the end of the step in flight, the one queued ahead
        self._deferred_ops: list[Callable[[], None]] = []
        # config.record_steps: each step as a step log line, and the step (or stretch) in flight's
        # shape and start until its end times are known
        self.step_log: list[dict] | None = [] if config.record_steps else None
        self._logging: tuple[tuple[int, ...], int, float] | None = None

    @property
    def is_idle(self) -> bool:
        return self.step_end_s is None

    def start_step(self, now_s: float) -> float | None:
        """Apply queued operations, schedule a batch; the step's end time, or None when idle."""
        if self.ops_now:
            ops_now, self.ops_now = self.ops_now, []
            for op in ops_now:
                op()
        if self._deferred_ops:   # the step they waited behind was never scheduled
            self._apply_deferred()
        if self.ops and (self._steady or self._queued_early) and self.scheduler.running:
            # The step queued ahead runs first; the engine's loop applies these operations
            # while it runs, so they are in the scheduler when it ends (finish_step).
            self._deferred_ops, self.ops = self.ops, []
        else:
            ops, self.ops = self.ops, []
            for op in ops:
                op()
        if not self.scheduler.has_work():
            self.step_end_s = None
            self._steady = self._queued_early = self._overlapped = False
            return None
        batch = self.scheduler.schedule()
        if not batch.seqs:  # waiting for blocks that only an operation (a release) can free
            self.step_end_s = None
            self._steady = self._queued_early = self._overlapped = False
            return None
        duration_s = self.step_duration_s(batch)
        self.batch = batch
        self.num_steps += 1
        self.busy_s += duration_s
        self.step_end_s = now_s + duration_s
        self.stretch_ends_s = None
        if self.collapse:
            num_steps = self._num_identical_steps(batch)
            if num_steps > 1:
                self.stretch_ends_s = self._stretch_ends_s(batch, num_steps, self.step_end_s)
                self.step_end_s = self.stretch_ends_s[-1]
        if self.step_log is not None:
            terms = step_terms(batch)
            self._logging = (terms, len(batch.seqs) - terms[2], now_s)   # prompts: the rest
            if self.stretch_ends_s is None:
                self._log_steps([self.step_end_s])
        self.generation += 1
        return self.step_end_s

    def _log_steps(self, ends_s: list[float]) -> None:
        """The step log's lines of the step or stretch in flight, which ends at ends_s: a decode
        stretch's context grows by its batch each step. A simulated step has no hand-off (its
        `resumed_s` is its end), and its `at_s` is its end in simulated seconds."""
        (prefill, cached, decodes, context, sampled), prompts, began_s = self._logging
        for i, end_s in enumerate(ends_s):
            self.step_log.append({"began_s": began_s, "ended_s": end_s, "resumed_s": end_s,
                                  "at_s": end_s, "prefill_tokens": prefill,
                                  "cached_tokens": cached, "decode_seqs": decodes,
                                  "context_tokens": context + i * decodes, "sampled": sampled,
                                  "prefill_seqs": prompts})
            began_s = end_s

    def cut_stretch(self, now_s: float) -> float | None:
        """An operation arrived during a stretch: end it with the step in flight; the new end."""
        ends = self.stretch_ends_s
        if ends is None or ends[-1] <= now_s:
            return None
        num_steps = bisect_left(ends, now_s) + 1
        del ends[num_steps:]
        self.step_end_s = ends[-1]
        self.generation += 1
        return self.step_end_s

    def run_stretch(self, on_batch: Callable[[ScheduledBatch, float], None] | None
                    ) -> list[Sequence]:
        """Run the planned steps through the scheduler; the sequences advanced by the last one.

        With `on_batch` every step is scheduled and shown to it; without, the first step is
        postprocessed and the rest advanced at once (`Scheduler.advance_decode`), which gives the
        same state per block instead of per token.
        """
        ends = self.stretch_ends_s
        self.stretch_ends_s = None
        if self.step_log is not None:
            self._log_steps(ends)
        self.num_steps += len(ends) - 1
        self.busy_s += ends[-1] - ends[0]
        if on_batch is None:
            seqs = self.batch.seqs
            self.finish_step()
            if len(ends) > 1:
                num_steps = self.scheduler.advance_decode(len(ends) - 1, self._next_token_ids)
                assert num_steps == len(ends) - 1, (num_steps, len(ends))
            # A stretch is steady decode to its last step; nothing is queued ahead during a pull.
            self._steady = self.lookahead and not self.scheduler.waiting_for_remote_kvs
            return seqs
        advanced: list[Sequence] = []
        for i, end_s in enumerate(ends):
            if i:
                self.batch = self.scheduler.schedule()
            on_batch(self.batch, end_s)
            advanced = self.finish_step()
        return advanced

    def _next_token_ids(self, seq: Sequence, num_steps: int) -> list[int]:
        """The synthetic tokens seq samples in its next num_steps steps (finish_step's rule)."""
        cycle, span = self._token_cycle, self._token_span
        first = seq.num_tokens
        if num_steps <= span:
            start = first % span
            return cycle[start:start + num_steps]
        return [cycle[n % span] for n in range(first, first + num_steps)]

    def finish_step(self) -> list[Sequence]:
        """Postprocess the step in flight; returns the sequences that got a token."""
        batch = self.batch
        self.batch = None
        scheduler = self.scheduler
        self._apply_deferred()   # operations arriving during this step wait a step too
        self._steady = (self.lookahead and self._batch_is_decode and not scheduler.waiting
                        and not scheduler.waiting_for_remote_kvs
                        and len(batch.seqs) == len(scheduler.running))
        cycle, span = self._token_cycle, self._token_span
        sampled = [cycle[seq.num_tokens % span]
                   if seq.num_computed_tokens + n == seq.num_tokens else None
                   for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        advanced = scheduler.postprocess(batch, sampled)
        # A step that samples nothing (a prompt's chunk before its last) is not waited for: the
        # loop's work after it overlaps its device work.
        self._overlapped = all(token is None for token in sampled)
        self._queued_early = (self.queue_prompts_early and not self._steady
                              and queues_before_hand_back(scheduler, batch))
        return advanced

    def _apply_deferred(self) -> None:
        ops, self._deferred_ops = self._deferred_ops, []
        for op in ops:
            op()

    def answer_delay_s(self, now_s: float) -> float:
        """How long after `now_s` (a step's end, the next step started) the prompts that step
        finished are answered: behind the next step's launch (`handoff_s`), or, replaying the
        older serving path, at the worker's next step boundary (the module docstring)."""
        if not self.answer_at_step_boundary:
            return self.handoff_s()
        if self.step_end_s is None:
            return 0.0
        batch = self.batch
        if any(batch.samples(i) for i in range(len(batch.seqs))):
            return self.step_end_s - now_s
        return min(self.chunk_launch_s, self.step_end_s - now_s)

    def handoff_s(self) -> float:
        """How long after a step's end its tokens leave, called once the next step has started:
        `prompt_launch_s` when that step, carrying prompt tokens, was queued before the
        hand-back, else 0."""
        if not self._queued_early or self.step_end_s is None or self._batch_is_decode:
            return 0.0
        return self.prompt_launch_s

    def step_duration_s(self, batch: ScheduledBatch) -> float:
        num_prefill, cached, num_decode, num_context, num_sampled = step_terms(batch)
        self._batch_is_decode = num_prefill == 0
        return (self.model.step_s(num_prefill, cached, num_decode, num_context,
                                  step_budget=self.step_budget)
                + self.step_overhead_s
                + (0.0 if num_prefill else self.token_overhead_s * num_sampled)
                + (self.chunk_overhead_s
                   if num_prefill and not self._queued_early and not self._overlapped else 0.0)
                + self.prefill_token_overhead_s * num_prefill
                + (self.extra_prompt_overhead_s * (len(batch.seqs) - num_decode - 1)
                   if num_prefill else 0.0))

    def _num_identical_steps(self, batch: ScheduledBatch) -> int:
        """How many steps, this one included, repeat this pure decode batch (1: no stretch)."""
        scheduler = self.scheduler
        if (self.ops or self.ops_now or self._deferred_ops or scheduler.waiting
                or len(batch.seqs) != len(scheduler.running)):
            return 1
        max_model_len = scheduler.limits.max_model_len
        num_steps = max_model_len
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            if num_new != 1 or seq.num_computed_tokens < seq.num_prompt_tokens:
                return 1  # a prefill row: the next step differs
            left = seq.params.max_tokens - seq.num_output_tokens
            num_steps = min(num_steps, left, max_model_len - seq.num_tokens)
        if num_steps <= 1:
            return 1
        # Every block the stretch allocates must be free now, or a step could preempt.
        num_needed = sum(seq.num_blocks_for(seq.num_tokens + num_steps - 1) - len(seq.block_table)
                         for seq in batch.seqs)
        return num_steps if num_needed <= self.block_manager.num_free_blocks else 1

    def _stretch_ends_s(self, batch: ScheduledBatch, num_steps: int, first_end_s: float
                        ) -> list[float]:
        batch_size = len(batch.seqs)
        context = sum(seq.num_tokens for seq in batch.seqs)  # of the first step
        # Every sequence samples at every step of a stretch: step_duration_s's serving costs.
        overhead_s = self.step_overhead_s + self.token_overhead_s * batch_size
        decode_steps_s = getattr(self.model, "decode_steps_s", None)
        if decode_steps_s is not None:  # one pass over the stretch; adding in step order
            steps_s = decode_steps_s(batch_size, context + batch_size, num_steps - 1)
            if overhead_s:
                steps_s = [step_s + overhead_s for step_s in steps_s]
            return list(accumulate(steps_s, initial=first_end_s))
        decode_s = self.model.decode_s
        ends = [first_end_s]
        end_s = first_end_s
        for _ in range(num_steps - 1):
            context += batch_size
            end_s += decode_s(batch_size, context) + overhead_s
            ends.append(end_s)
        return ends

    def stats(self) -> WorkerStats:
        """What a heartbeat carries (worker/base.py `stats`)."""
        scheduler, manager = self.scheduler, self.block_manager
        return WorkerStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_blocks=manager.num_blocks, num_free_blocks=manager.num_free_blocks,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
            num_pinned_requests=scheduler.num_pinned_requests)

    def is_drained(self) -> bool:
        """No request left and every block back in the free queue (cached or not)."""
        scheduler = self.scheduler
        return (not scheduler.has_work() and scheduler.num_pinned_requests == 0
                and not scheduler.waiting_for_remote_kvs
                and self.block_manager.num_free_blocks == self.block_manager.num_blocks)
