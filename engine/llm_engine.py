"""The engine: requests in, token ids out, one `step()` at a time.

A step is schedule, run, postprocess. The engine works in token ids only; turning them into text and
matching stop strings is the output processor's job (engine/output_processor.py), which calls
`finish_request` when a stop string appears. That keeps detokenization out of the worker processes
in disaggregated serving, where the frontend does it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import ROLES, EngineConfig
from tandem.engine.loader import build_model
from tandem.engine.lookahead import blocks_written, plan_ahead, queues_before_hand_back
from tandem.engine.model_info import describe_model
from tandem.engine.model_runner import ModelRunner, PendingStep, bytes_per_block
from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.role_schedulers import DecodeScheduler, make_scheduler
from tandem.engine.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from tandem.engine.sequence import FinishReason, Sequence
from tandem.engine.step_buckets import MAX_DECODE_BATCH, MAX_TOKENS as MAX_STEP_TOKENS
from tandem.engine.structured_output import JsonGrammar, StructuredOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SequenceUpdate:
    """What one step did to one request."""
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[tuple[float, dict[int, float]]]
    finished: bool
    finish_reason: FinishReason | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_cached_tokens: int
    queue_time_s: float | None = None  # arrival here until first scheduled; None: not scheduled


def merge_updates(earlier: SequenceUpdate, later: SequenceUpdate) -> SequenceUpdate:
    """Two consecutive updates of one request as one."""
    return SequenceUpdate(
        earlier.request_id, earlier.new_token_ids + later.new_token_ids,
        earlier.new_logprobs + later.new_logprobs, later.finished, later.finish_reason,
        later.stop_reason, later.num_prompt_tokens, later.num_cached_tokens,
        earlier.queue_time_s if earlier.queue_time_s is not None else later.queue_time_s)


@dataclass(slots=True)
class InFlightStep:
    """A scheduled step whose forward pass and sampling are queued on the device."""
    batch: ScheduledBatch
    pending: PendingStep
    held: list[int] = field(default_factory=list)  # blocks it writes, referenced until collected
    host_s: float = 0.0   # seconds the host took to schedule and queue it


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int     # of which were found
    num_pinned_requests: int   # prefill role: finished requests whose blocks await a pull
    num_preemptions: int = 0   # requests preempted to free KV blocks, since the start


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_info = describe_model(config.model, config.max_model_len)
        self.model_dir = self.model_info.model_dir
        self.model_config = self.model_info.config
        self.max_model_len = self.model_info.max_model_len
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({config.max_num_batched_tokens}) "
                f"must be at least max_model_len ({self.max_model_len})")
        model = build_model(self.model_config, self.device, self.dtype, self.model_dir,
                            self.max_model_len, config.seed)
        self.runner = ModelRunner(model, config.block_size, self.device, self.dtype, config.seed)
        self.num_blocks = self._num_kv_blocks()
        # One block past the block manager's is never given to a request: KV transfer may read
        # scratch data into it (NixlKVAgent.warm) without touching any request's KV.
        self.spare_block = self.num_blocks
        self.runner.allocate_kv_cache(self.num_blocks + 1)
        if self.device.type == "cuda":
            self.runner.compile_kernel_variants()
            if not config.enforce_eager:
                self.runner.capture_graphs(min(config.max_num_seqs, MAX_DECODE_BATCH),
                                           self.max_model_len,
                                           min(config.max_num_batched_tokens, MAX_STEP_TOKENS))
        self.block_manager = BlockManager(self.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        limits = SchedulerLimits(config.max_num_seqs, config.max_num_batched_tokens,
                                 self.max_model_len, config.enable_chunked_prefill)
        self.scheduler: Scheduler = make_scheduler(
            config.role, limits, self.block_manager, set(self.model_config.eos_token_ids))
        self.sequences: dict[str, Sequence] = {}
        # Called with each step before its tokens are applied (engine/step_log.py)
        self.step_observer: Callable[[InFlightStep], None] | None = None
        self.structured_output = StructuredOutput(self.model_dir, self.model_config.vocab_size,
                                                  tuple(self.model_config.eos_token_ids))
        logger.info("engine ready: %s on %s (%s), role %s, KV cache %d blocks x %d tokens = %d "
                    "tokens", config.model, self.device, self.dtype, config.role, self.num_blocks,
                    config.block_size, self.num_blocks * config.block_size)

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        """`arrival_time` (time.monotonic()): when the request reached the worker, if earlier
        than now; its queue time counts from then."""
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        if arrival_time is not None:
            seq.arrival_time = min(arrival_time, seq.arrival_time)
        self.scheduler.add(seq)
        self.sequences[request_id] = seq

    def _new_sequence(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams) -> Sequence:
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        seq = Sequence(request_id, list(prompt_token_ids), params, self.config.block_size,
                       arrival_time=time.monotonic())
        seq.generator = self.runner.sampler.request_generator(params)
        if params.json_schema is not None:
            seq.grammar = self._grammar(params, prompt_token_ids)
        return seq

    def _grammar(self, params: SamplingParams, prompt_token_ids: list[int]) -> JsonGrammar:
        grammar = self.structured_output.grammar(params.json_schema)
        num_output = params.num_schema_prompt_tokens
        if num_output >= len(prompt_token_ids):
            raise ValueError(f"num_schema_prompt_tokens ({num_output}) must be less than the "
                             f"prompt's {len(prompt_token_ids)} tokens")
        for token_id in prompt_token_ids[len(prompt_token_ids) - num_output:]:
            grammar.accept(token_id)   # a migrated request's output so far
        return grammar

    def add_running_request(self, request_id: str, prompt_token_ids: list[int],
                            params: SamplingParams, num_computed_tokens: int) -> Sequence:
        """A request already running with its first `num_computed_tokens` in the KV cache (their
        contents unspecified): for timing steps at any point of a request (`tandem profile`).
        The sequence is returned to be read, not changed."""
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        self.scheduler.add_running(seq, num_computed_tokens)
        self.sequences[request_id] = seq
        return seq

    def request_ids(self) -> list[str]:
        """The unfinished requests."""
        return list(self.sequences)

    def finish_request(self, request_id: str, reason: FinishReason = FinishReason.ABORT,
                       stop_reason: str | int | None = None) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, reason, stop_reason)

    # ---- disaggregation: the prefill side ----------------------------------------------------

    def pinned_blocks(self, request_id: str) -> list[int] | None:
        """Prefill role: the blocks holding a finished request's prompt KV, until released."""
        return self.scheduler.pinned_blocks(request_id)

    def release_pinned(self, request_id: str) -> bool:
        return self.scheduler.release_pinned(request_id)

    def pinned_request_ids(self) -> list[str]:
        """Prefill role: every request whose blocks are pinned now, however it got there."""
        return self.scheduler.pinned_request_ids()

    # ---- disaggregation: the decode side -----------------------------------------------------

    def add_remote_request(self, request_id: str, prompt_token_ids: list[int],
                           first_token_id: int, params: SamplingParams
                           ) -> tuple[int, list[int]] | None:
        """Decode role: park a request whose prompt KV will be pulled from a prefill worker.

        Returns (leading prompt blocks already cached here, local block ids to pull the remaining
        prompt blocks into). None means no blocks are free now, and the request was queued to
        recompute its prompt here instead. Its stream continues after `first_token_id`.
        """
        scheduler = self._decode_scheduler()
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        if seq.grammar is not None:
            seq.grammar.accept(first_token_id)   # sampled under the same grammar on the prefill side
        plan = scheduler.add_remote(seq, first_token_id)
        self.sequences[request_id] = seq
        return plan

    def complete_remote_request(self, request_id: str, succeeded: bool) -> SequenceUpdate | None:
        """The pull finished (or failed: then the prompt is recomputed here).

        Returns the final update when the first token already ended the request.
        """
        self._decode_scheduler().complete_remote(request_id, succeeded)
        seq = self.sequences[request_id]
        if not seq.is_finished:
            return None
        self.sequences.pop(request_id)
        return SequenceUpdate(request_id, [], [], True, seq.finish_reason, seq.stop_reason,
                              seq.num_prompt_tokens, seq.num_cached_prompt_tokens)

    def _decode_scheduler(self) -> DecodeScheduler:
        if not isinstance(self.scheduler, DecodeScheduler):
            raise ValueError(f"remote prefill needs an engine in the decode role, not "
                             f"{self.config.role!r}")
        return self.scheduler

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        return EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_blocks=self.num_blocks, num_free_blocks=self.block_manager.num_free_blocks,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
            num_pinned_requests=scheduler.num_pinned_requests,
            num_preemptions=scheduler.num_preemptions)

    def has_request(self, request_id: str) -> bool:
        """Whether the request is still unfinished here."""
        return request_id in self.sequences

    @property
    def kv_cache(self) -> torch.Tensor:
        """The whole KV cache tensor (DESIGN.md, "KV layout"), spare block included."""
        return self.runner.kv_cache

    def subscribe_kv_events(self, callback) -> None:
        """`callback(event)` for every KV event of the block manager (stored, removed, cleared)."""
        self.block_manager.subscribe(callback)

    def kv_snapshot(self) -> tuple[int, list[int], list[int | None]]:
        """(id of the last KV event, cached block hashes, their parents), taken together."""
        manager = self.block_manager
        hashes, parents = manager.cached_hashes()
        return manager.next_event_id - 1, hashes, parents

    def default_sampling_params(self) -> SamplingParams:
        return self.model_info.default_sampling_params()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- role ------------------------------------------------------------------------------

    def set_role(self, role: str) -> None:
        """Switch to `role`'s scheduling policy in place, keeping the weights and the KV cache.

        The role picks the scheduler (DESIGN.md, "Roles"); a flip builds the new role's scheduler
        over the same block manager, so cached prefixes stay valid and no memory moves. Only an
        idle engine flips: a request in flight (running, waiting, parked for a pull, or prefilled
        with its blocks pinned) belongs to the old policy. Raises ValueError otherwise.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if role == self.config.role:
            return
        old = self.scheduler
        if self.sequences or old.has_work() or old.num_pinned_requests:
            raise ValueError(f"cannot switch from {self.config.role} to {role} with requests in "
                             f"flight: {len(self.sequences)} unfinished, "
                             f"{old.num_pinned_requests} pinned; drain first")
        self.scheduler = make_scheduler(role, old.limits, self.block_manager, old.eos_token_ids)
        self.scheduler.prefix_cache_queries = old.prefix_cache_queries
        self.scheduler.prefix_cache_hits = old.prefix_cache_hits
        self.scheduler.num_preemptions = old.num_preemptions
        self.config = replace(self.config, role=role)
        logger.info("engine switched from %s to %s; %d KV blocks free of %d", old.__class__.__name__,
                    role, self.block_manager.num_free_blocks, self.num_blocks)

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[SequenceUpdate]:
        return self.finish_step(self.begin_step())

    def steps(self, launch_before_yield: bool = True) -> Iterator[list[SequenceUpdate]]:
        """Step until nothing is scheduled, yielding each step's updates. When every running
        sequence decodes and nothing waits, the next step is queued on the device before this
        one's tokens are even read (engine/lookahead.py), so no host work sits between two steps
        on the device. Otherwise, with `launch_before_yield`, the next step is scheduled and
        queued before the yield, so the caller's handling of the updates overlaps it (offline
        generation); without, after it, so requests the caller adds join that step (serving),
        unless this step decoded and prompt tokens are left to compute: the next step's chunk is
        already decided (a request added now queues behind it), and scheduled before the yield
        its host work does not contend with the caller's relay of the decoded tokens to their
        streams while the device waits for it.

        Between yields the caller may add requests, finish them (a stop string, an abort) and
        allocate or free blocks (KV transfer), with a step in flight: a finished request's token
        in that step is dropped, and the step holds a reference on every block it writes until it
        is collected, so none of them is handed out while the device may still write it.
        """
        step = self._held(self.begin_step())
        while step is not None:
            ahead = self._begin_ahead(step)
            updates = self.finish_step(step)
            finished, step = step.batch, ahead
            if step is None and (launch_before_yield
                                 or queues_before_hand_back(self.scheduler, finished)):
                step = self._held(self.begin_step())
            yield updates
            if step is None and not launch_before_yield:
                step = self._held(self.begin_step())

    def _begin_ahead(self, step: InFlightStep) -> InFlightStep | None:
        if step.pending.tokens is None:
            return None
        began_s = time.perf_counter()
        plan = plan_ahead(self.scheduler, step.batch, self.runner.can_launch_ahead)
        if plan is None:
            return None
        ahead = InFlightStep(plan.batch, self.runner.launch_ahead(plan.batch, plan.rows,
                                                                  step.pending),
                             blocks_written(plan.batch, ahead=True))
        ahead.host_s = time.perf_counter() - began_s
        self.block_manager.acquire(ahead.held)
        return ahead

    def _held(self, step: InFlightStep | None) -> InFlightStep | None:
        if step is not None:
            step.held = blocks_written(step.batch, ahead=False)
            self.block_manager.acquire(step.held)
        return step

    def begin_step(self) -> InFlightStep | None:
        """Schedule a step and queue it on the device, without waiting for it; None when there
        is nothing to run. `finish_step` must follow before any other call that changes requests
        (add, finish, another step)."""
        began_s = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return None
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        pending = self.runner.launch(batch)
        return InFlightStep(batch, pending, host_s=time.perf_counter() - began_s)

    def finish_step(self, step: InFlightStep | None) -> list[SequenceUpdate]:
        """Wait for a step's tokens and apply them: what the step did to each request."""
        if step is None:
            return []
        batch = step.batch
        if self.step_observer is not None:
            self.step_observer(step)
        out = self.runner.collect(step.pending)
        advanced = self.scheduler.postprocess(batch, out.token_ids)
        if step.held:
            self.block_manager.free(step.held)
        logprobs = {seq.request_id: lp for seq, lp in zip(batch.seqs, out.logprobs) if lp}
        updates = []
        for seq in advanced:
            if seq.grammar is not None:
                seq.grammar.accept(seq.token_ids[-1])
            update = SequenceUpdate(
                seq.request_id, [seq.token_ids[-1]],
                [logprobs[seq.request_id]] if seq.request_id in logprobs else [],
                seq.is_finished, seq.finish_reason, seq.stop_reason, seq.num_prompt_tokens,
                seq.num_cached_prompt_tokens, seq.queue_time_s)
            updates.append(update)
            if seq.is_finished:
                self.sequences.pop(seq.request_id, None)
        return updates

    # ---- set-up ------------------------------------------------------------------------------

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        block_bytes = bytes_per_block(self.model_config, self.config.block_size, self.dtype)
        if self.device.type == "cuda":
            # Whatever else lives on the GPU (weights, other processes) is already out of `free`;
            # the largest step's activations are measured, not guessed.
            peak = self.runner.profile_peak_bytes(self.config.max_num_batched_tokens,
                                                  self.config.max_num_seqs)
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - self.config.gpu_memory_utilization) * total - peak
            logger.info("GPU memory: %.1f GiB total, %.1f GiB free after weights, %.2f GiB peak "
                        "activations", total / 2**30, free / 2**30, peak / 2**30)
        else:
            budget = self.config.cpu_kv_cache_gib * 2**30
        num_blocks = int(budget // block_bytes)
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache: {budget / 2**30:.2f} GiB for "
                             f"blocks of {block_bytes / 2**20:.2f} MiB")
        return num_blocks
