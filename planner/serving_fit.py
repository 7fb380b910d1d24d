"""What a serving worker adds to the profile's bare steps, read off one real run.

The profile times `LLMEngine.step()` alone. These fits take a real run's observed steps and first
tokens, or a worker's step log, and return the extra costs that `tandem simulate` adds through its
flags (benchmarks/sim_accuracy_bench.py `overheads` writes them into a profile's `serving`
section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from tandem.planner.perf_model import PerfModel


def fit_serving_overhead(model: PerfModel, steps: Iterable[tuple[float, int, int]]
                         ) -> tuple[float, float]:
    """(seconds per step, seconds per sequence) that serving adds to the model's decode step.

    `steps` are pure decode steps observed on a serving worker: (duration_s, batch_size,
    num_context_tokens). The profile times `LLMEngine.step()` alone; a serving worker adds its
    loop and one gRPC message per sequence per step, so the excess over `decode_s` is fitted as a
    line in the batch size (`tandem simulate --step-overhead-ms --token-overhead-us`). The median
    excess of each batch size is fitted, weighted by its count, so that a few steps mis-read from
    token timestamps do not pull the line.
    """
    excess: dict[int, list[float]] = {}
    for duration_s, batch_size, context in steps:
        if batch_size > 0:
            excess.setdefault(batch_size, []).append(duration_s
                                                     - model.decode_s(batch_size, context))
    if len(excess) < 2:
        raise ValueError("need decode steps of at least two batch sizes to fit an overhead")
    sizes = sorted(excess)
    weights = np.sqrt([len(excess[b]) for b in sizes])
    medians = [float(np.median(excess[b])) for b in sizes]
    x = np.column_stack([np.ones(len(sizes)), sizes]) * weights[:, None]
    (per_step_s, per_seq_s), *_ = np.linalg.lstsq(x, np.array(medians) * weights, rcond=None)
    return max(float(per_step_s), 0.0), max(float(per_seq_s), 0.0)


@dataclass(frozen=True, slots=True)
class PrefillServing:
    """What a serving prefill worker adds to the profile's steps (`tandem simulate`'s flags)."""
    prefill_token_overhead_s: float  # per prompt token of a step (--prefill-token-overhead-us)
    chunk_launch_s: float    # an answer held behind the next chunk's launch (--chunk-launch-ms)
    fixed_s: float           # per request, before the prefill worker (--frontend-overhead-ms)
    num_mid: int             # requests each estimate rests on
    num_isolated: int
    num_heads: int


def fit_prefill_serving(model: PerfModel, requests: Iterable[tuple[float, float, int]],
                        chunk_tokens: int, margin_s: float = 0.03) -> PrefillServing:
    """Read a serving prefill worker's costs off one real run's first tokens.

    `requests` are (start_s, ttft_s, prompt tokens) of a run whose first tokens all come from one
    prefill worker, FIFO. A request is queued when it arrived more than `margin_s` before the
    previous first token (so it waited behind it). Three kinds of request give three costs:
    inside a queue (it, the one before and the one after queued), first tokens are one service
    apart, the model's chunk steps plus the overhead per prompt token; alone (neither it nor the
    next queued), the time to first token is the fixed latency plus that service; at the head of
    a queue (not queued, the next one is), the answer also waits for the next chunk's launch.
    Medians, so that a few requests held up elsewhere do not pull the estimates.

    The overhead is priced per prompt token, not per chunk: fitted on 2048-token chunks, a cost
    per chunk put 2 aggregated workers with 512-token chunks 19-149% over the real TTFT p50, a
    cost per token 2-40% (benchmarks/RESULTS.md).
    """
    rows = sorted((start_s + ttft_s, start_s, ttft_s, n) for start_s, ttft_s, n in requests)
    queued = [False] + [rows[i][1] < rows[i - 1][0] - margin_s for i in range(1, len(rows))]
    queued.append(False)  # nothing follows the last request
    mid, isolated, heads = [], [], []
    for i, (first_s, _, ttft_s, num_prompt) in enumerate(rows):
        chunks = [min(chunk_tokens, num_prompt - c) for c in range(0, num_prompt, chunk_tokens)]
        service_s = sum(model.prefill_s(n, i_chunk * chunk_tokens)
                        for i_chunk, n in enumerate(chunks))
        if i and queued[i - 1] and queued[i] and queued[i + 1]:
            mid.append((first_s - rows[i - 1][0] - service_s) / num_prompt)
        elif not queued[i]:
            (heads if queued[i + 1] else isolated).append((ttft_s - service_s, num_prompt))
    if not mid or not isolated or not heads:
        raise ValueError(f"need requests inside a queue, alone and at a queue's head; got "
                         f"{len(mid)}, {len(isolated)}, {len(heads)}: use a busier run")
    overhead_s = max(float(np.median(mid)), 0.0)
    fixed_s = max(float(np.median([e - n * overhead_s for e, n in isolated])), 0.0)
    launch_s = max(float(np.median([e - n * overhead_s for e, n in heads])) - fixed_s, 0.0)
    return PrefillServing(overhead_s, launch_s, fixed_s, len(mid), len(isolated), len(heads))


@dataclass(frozen=True, slots=True)
class StepInterval:
    """One step of a serving worker's step log and its time: its span on the device's timeline
    (benchmarks/serving_overheads.device_spans_s), or in a log without host times from its start
    to the next step's start (the engine's step, the hand-off of its tokens and the loop's work
    before the next)."""
    interval_s: float
    prefill_tokens: int
    cached_tokens: int
    decode_seqs: int
    context_tokens: int
    sampled: int
    # Queued before the hand-back of the step before it (engine/lookahead.py): the loop's relay of
    # that step's tokens and the operations it applies ran while this one was on the device.
    queued_early: bool = False
    prompts: int = 1   # the prompts its prompt tokens came from (a step log's prefill_seqs)


# Prompt steps not queued early a fit of their own cost needs: a log of one busy case may hold
# one or two, whose median is any one step's noise (37 ms for llama-3.1-8b's 4.5 req/s case).
MIN_FIRST_STEPS = 10


@dataclass(frozen=True, slots=True)
class StepServing:
    """What a serving worker adds to the profile's steps, read off its step log."""
    step_overhead_s: float           # per step (--step-overhead-ms)
    token_overhead_s: float          # per sampled token (--token-overhead-us)
    prefill_token_overhead_s: float  # per prompt token of a step (--prefill-token-overhead-us)
    chunk_overhead_s: float          # per prompt step not queued early (--chunk-overhead-ms)
    num_decode: int                  # steps each estimate rests on
    num_chunk: int
    num_first: int                   # of num_chunk, the steps not queued early
    extra_prompt_overhead_s: float = 0.0   # per prompt past the first (--extra-prompt-overhead-ms)
    num_several: int = 0             # of num_chunk, the steps queued early with several prompts


def fit_step_intervals(model: PerfModel, steps: Iterable[StepInterval],
                       step_budget: int | None = None) -> StepServing:
    """The serving costs `tandem simulate` adds to each step, fitted on a real worker's steps.

    Unlike `fit_serving_overhead`, which reads decode steps off the tokens a client saw, a step
    log times every step of any worker, an aggregated one too. Pure decode steps give the cost
    per step and per sampled token (a line in the batch size, as `fit_serving_overhead`); steps
    with a prompt chunk then give the cost per prompt token: the median over those steps of
    what is left of their interval after the step cost, per prompt token. Their sampled tokens
    are not charged the decode steps' cost: on the H200 step logs a step with a chunk shows
    none (qwen3-0.6b: -1 to -3 us a sampled token, least squares with the prompt tokens).
    Where the log tells steps queued before
    the hand-back from the others and has both, the cost per prompt token comes from the first
    kind, and the others (at least MIN_FIRST_STEPS of them) give the cost of a step that waited
    for the loop's hand-back of the step before: the median of what is left of their interval
    after that. Where the log says how many prompts each step's tokens came from and at least
    MIN_FIRST_STEPS steps queued early had several, the cost per prompt token comes from those
    of one prompt, and theirs gives the cost of each prompt past the first.
    """
    steps = list(steps)
    decode = [(s.interval_s, s.decode_seqs, s.context_tokens) for s in steps
              if not s.prefill_tokens and s.decode_seqs]
    per_step_s, per_seq_s = fit_serving_overhead(model, decode)
    prompt = [s for s in steps if s.prefill_tokens]
    if not prompt:
        raise ValueError("the step log holds no step with a prompt chunk")

    def left_s(s: StepInterval) -> float:   # a step with a chunk pays no per-token cost
        return (s.interval_s - per_step_s
                - model.step_s(s.prefill_tokens, s.cached_tokens, s.decode_seqs,
                               s.context_tokens, step_budget))

    early = [s for s in prompt if s.queued_early]
    first = [s for s in prompt if not s.queued_early]
    if not early or len(first) < MIN_FIRST_STEPS:   # too few to tell one kind from the other
        early, first = prompt, []
    several = [s for s in early if s.prompts > 1]
    if len(several) < MIN_FIRST_STEPS:
        several = []
    single = [s for s in early if s.prompts == 1] if several else early
    per_token_s = max(float(np.median([left_s(s) / s.prefill_tokens for s in single])), 0.0)
    extra_s = (max(float(np.median([(left_s(s) - per_token_s * s.prefill_tokens) / (s.prompts - 1)
                                    for s in several])), 0.0) if several else 0.0)
    chunk_s = (max(float(np.median([left_s(s) - per_token_s * s.prefill_tokens
                                    - extra_s * (s.prompts - 1) for s in first])), 0.0)
               if first else 0.0)
    return StepServing(per_step_s, per_seq_s, per_token_s, chunk_s, len(decode), len(prompt),
                       len(first), extra_s, len(several))
