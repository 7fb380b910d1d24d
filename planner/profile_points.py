"""Measuring one profile point with the real engine: the step serving runs, timed.

Reaching a given step shape by feeding requests (prefill 256 prompts of 8k tokens to time one
decode step) would take longer than the whole profile may. So the state is placed directly: each
sequence gets its tokens, KV blocks from the block manager for the tokens counted as computed, and a
place in the scheduler's running list. Then `LLMEngine.step()` runs exactly as it does in serving:
the scheduler forms the batch (decodes take one token each, the prefill sequence its chunk), the
runner executes it (through the captured CUDA graphs for decode-only batches), the sampler reads the
tokens back, and postprocess records them. What the KV cache holds does not change a step's time,
so the placed blocks keep whatever the cache held before (random values, filled once).

A prefill or mixed step is timed with a host clock after `torch.cuda.synchronize` on both sides:
the wall time of a step is what a serving loop waits for. Decode steps run back to back as a
serving worker runs them (`decode`). How often each point is repeated, and in which order, is
planner/profile_sweep.py's business.

`place` reaches into the engine (its scheduler's running list and its sequence table): the engine
has no public way to start a sequence part-way through its prompt, and the profiler is the only
caller that needs one. It is kept to this one method.
"""

from __future__ import annotations

import gc
import logging
import random
import statistics
import time
from dataclasses import replace

import torch

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.sequence import Sequence
from tandem.planner.profile_grid import Repeats

logger = logging.getLogger(__name__)


class StepProbe:
    """Places sequences into an engine and times its steps."""

    def __init__(self, engine: LLMEngine, seed: int = 0):
        self.engine = engine
        self.params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        rng = random.Random(seed)
        vocab = engine.model_config.vocab_size
        # One pool of token ids, sliced per sequence: building a 1M-token list per point is slow.
        self.token_pool = [rng.randrange(vocab) for _ in range(engine.max_model_len + 1)]
        self.next_id = 0
        self._fill_kv_cache()

    def _fill_kv_cache(self) -> None:
        cache = self.engine.kv_cache
        with torch.inference_mode():
            for chunk in cache.split(1024, dim=0):  # bounded scratch memory
                chunk.normal_(0.0, 0.5)

    def sync(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    def place(self, num_tokens: int, num_computed_tokens: int,
              params: SamplingParams | None = None) -> Sequence:
        """A running sequence of num_tokens tokens, the first num_computed_tokens already in KV;
        it decodes without end unless `params` say otherwise."""
        engine = self.engine
        request_id = f"profile-{self.next_id}"
        self.next_id += 1
        offset = self.next_id % 997
        tokens = self.token_pool[offset:offset + num_tokens]
        if len(tokens) < num_tokens:
            tokens += self.token_pool[:num_tokens - len(tokens)]
        try:
            return engine.add_running_request(request_id, tokens, params or self.params,
                                              num_computed_tokens)
        except ValueError as err:
            raise RuntimeError(f"no room for {num_tokens} tokens: {err}") from None

    def remove(self, seq: Sequence) -> None:
        self.engine.finish_request(seq.request_id)

    def clear(self) -> None:
        for request_id in self.engine.request_ids():
            self.engine.finish_request(request_id)

    def step_s(self, expect_tokens: int) -> float:
        """Time one engine step; checks that it ran the batch that was placed."""
        self.sync()
        # The garbage collector would run on the profiler's own allocations (placed sequences),
        # which serving does not make: pause it for the step, not for placement.
        gc.disable()
        try:
            start = time.perf_counter()
            updates = self.engine.step()
            self.sync()
            seconds = time.perf_counter() - start
        finally:
            gc.enable()
        if len(updates) != expect_tokens:
            raise RuntimeError(f"the step sampled {len(updates)} tokens, {expect_tokens} expected: "
                               "the placed batch did not run as placed (out of KV blocks?)")
        return seconds

    def warm_up(self, num_new: int) -> None:
        """Steps of each kind before the first point: clocks, allocator and caches settle."""
        for _ in range(2):
            self.prefill_once(num_new, 0)
        decodes = self.place_decodes(min(8, self.engine.config.max_num_seqs), 64)
        for _ in range(2):
            self.mixed_once(num_new // 2, 0, decodes)
        self.clear()
        self.decode(min(16, self.engine.config.max_num_seqs), 64, Repeats(8, 1, 1))

    # ---- the three step kinds ----------------------------------------------------------------

    def prefill_once(self, num_new: int, num_cached: int) -> float:
        """One prompt's last chunk: num_new tokens after num_cached already in KV."""
        seq = self.place(num_cached + num_new, num_cached)
        seconds = self.step_s(expect_tokens=1)
        self.remove(seq)
        return seconds

    def place_decodes(self, batch_size: int, context_tokens: int) -> list[Sequence]:
        """batch_size sequences that each decode their next token at context_tokens."""
        return [self.place(context_tokens, context_tokens - 1) for _ in range(batch_size)]

    def mixed_once(self, num_new: int, num_cached: int, decodes: list[Sequence],
                   num_prompts: int = 1) -> tuple[float, int]:
        """A prefill chunk scheduled after the decode batch, as the running list orders them:
        num_new prompt tokens, the last ones of num_prompts prompts (as evenly as they split),
        each after num_cached tokens already in KV.

        Returns (seconds, the decode batch's context tokens in that step).
        """
        context = sum(s.num_tokens for s in decodes)
        sizes = [num_new // num_prompts + (i < num_new % num_prompts) for i in range(num_prompts)]
        seqs = [self.place(num_cached + size, num_cached) for size in sizes]
        seconds = self.step_s(expect_tokens=len(decodes) + num_prompts)
        for seq in seqs:
            self.remove(seq)
        return seconds, context

    def mixed_series(self, num_new: int, num_cached: int, batch_size: int, context_tokens: int,
                     num_steps: int = 4) -> tuple[float, int, int]:
        """Mixed steps as a serving worker runs a long prompt beside a decode batch: through
        `LLMEngine.steps()`, each step num_new prompt tokens of one prompt (its cached prefix
        num_cached, then growing by num_new a step) after batch_size decodes of context_tokens
        each. Every step decodes with prompt tokens left, so the engine queues the next before it
        hands back this one's tokens (engine/lookahead.py), and a step's time is the interval
        between its tokens and the previous step's, host work included as serving pays it (the
        opt-in alternative to `mixed_once`'s one step timed between synchronizations; measured
        on both H200 profiles no closer to real runs, benchmarks/RESULTS.md).

        The interval ending with a step's tokens holds the rest of that step's device work and
        the next step's host work (queued before the yield), so the first and the last (no step
        follows) are left out. Returns (the median of the others, the prompt's mean cached tokens
        and the decode batch's mean context tokens over their steps)."""
        engine = self.engine
        limits = engine.scheduler.limits
        decode_params = SamplingParams(temperature=0.0, max_tokens=num_steps + 1, ignore_eos=True)
        decodes = [self.place(context_tokens, context_tokens - 1, decode_params)
                   for _ in range(batch_size)]
        prompt = self.place(num_cached + num_new * (num_steps + 1), num_cached,
                            SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        # Each step's budget takes the decodes and one chunk; the prompt's last chunk and the
        # decodes' last tokens come in the same step, so the series ends by itself.
        engine.scheduler.limits = replace(limits, max_num_batched_tokens=num_new + batch_size)
        try:
            served = self._served(lambda: (prompt.num_computed_tokens - num_new,
                                           sum(s.num_tokens for s in decodes) - batch_size))
        finally:
            engine.scheduler.limits = limits
        self.clear()
        intervals = [b[0] - a[0] for a, b in zip(served, served[1:])]
        shapes = [shape for _, _, shape in served]
        if num_steps < 3 or len(intervals) < num_steps:
            raise RuntimeError(f"a mixed series ran {len(intervals) + 1} steps, "
                               f"{num_steps + 1} (at least 4) expected (out of KV blocks?)")
        timed = intervals[1:-1]
        # Interval i ends with step i + 1's tokens: that step's shape.
        cached = [c for c, _ in shapes[2:len(timed) + 2]]
        contexts = [k for _, k in shapes[2:len(timed) + 2]]
        return (statistics.median(timed), round(statistics.mean(cached)),
                round(statistics.mean(contexts)))

    def _served(self, shape) -> list[tuple[float, int, object]]:
        """Runs the placed sequences as a serving worker does, through `LLMEngine.steps()` (each
        step queued before the previous one's tokens are read when it can be), until they end:
        per step, when its tokens came back, how many, and shape() read then."""
        served = []
        self.sync()
        gc.disable()   # as in step_s
        try:
            for updates in self.engine.steps(launch_before_yield=False):
                now = time.perf_counter()
                served.append((now, len(updates), shape()))
        finally:
            gc.enable()
        return served

    def decode(self, batch_size: int, context_tokens: int, repeats: Repeats) -> dict:
        """Decode steps of batch_size sequences of context_tokens each: `decode_contexts`."""
        return self.decode_contexts([context_tokens] * batch_size, repeats)

    def decode_contexts(self, contexts: list[int], repeats: Repeats) -> dict:
        """Decode steps of one sequence per context in `contexts` (they grow by one a step),
        run as a serving worker runs them: through `LLMEngine.steps()`, where each step is
        queued on the device before the previous one's tokens are read (engine/lookahead.py), so
        the host work between two steps is hidden as it is in serving. A step's time is the
        interval between its tokens and the previous step's; timed one step at a time between
        synchronizations, as prefill and mixed points are, a decode step also carried its host
        work (on an H200, llama-3.1-8b at 4k context: 4.7-4.9 ms against serving's 4.6 ms
        interval, benchmarks/RESULTS.md)."""
        # The sequences end by themselves after the steps wanted: stopping the generator early
        # would leave a step queued ahead.
        params = SamplingParams(temperature=0.0, max_tokens=repeats.max_steps + 1,
                                ignore_eos=True)
        seqs = [self.place(context, context - 1, params) for context in contexts]
        batch_size = len(seqs)
        served = self._served(lambda: sum(s.num_tokens for s in seqs))
        self.clear()
        # Past the steps wanted: the sequences' last step, and the one queued behind it.
        served = served[:repeats.max_steps + 1]
        for _, num_updates, _ in served:
            if num_updates != batch_size:
                raise RuntimeError(f"a decode step sampled {num_updates} tokens, {batch_size} "
                                   "expected (out of KV blocks?)")
        # (seconds, context tokens of that step)
        intervals = [(b[0] - a[0], a[2]) for a, b in zip(served, served[1:])]
        timed = intervals[repeats.warmup:]
        count = repeats.min_timed
        while count < min(repeats.max_timed, len(timed)) \
                and sum(t for t, _ in timed[:count]) < repeats.budget_s:
            count += 1
        timed = timed[:count]
        return {"batch_size": batch_size,
                "num_context_tokens": round(statistics.mean(c for _, c in timed)),
                "seconds": statistics.median(t for t, _ in timed), "num_repeats": len(timed)}
