"""A serving worker's engine steps, one JSON line each: what each step computed and where its time
went, for comparing serving with the profile's bare steps (benchmarks/step_log_report.py).

A profile times `LLMEngine.step()` alone. A serving worker runs the same steps from its event
loop: each step on the step thread, then the loop hands the tokens to their streams and applies
what arrived meanwhile before it starts the next. When the worker runs `TANDEM_STEP_LOG_DIR=DIR`,
`StepLog` writes for every step
- `began_s`, `ended_s`: the step thread's `next()` over the engine's steps: scheduling, launch,
  the device and the token handling (with lookahead, a decode step already queued is included
  from wherever it was when the call began);
- `resumed_s`: when the event loop took the tokens, after the thread handed them back;
- `at_s`: the same moment in epoch seconds (`time.time()`), to cut a log by wall-clock times;
- the shape the performance model prices a step by: prompt tokens, their token-weighted cached
  prefix, decoding sequences and their context tokens, and tokens sampled;
- `prefill_seqs`: how many prompts those tokens came from (the model prices them as one);
- `host_s`: the host's time to schedule the step and queue it on the device (for a decode step
  launched ahead, while the step before it ran). A step whose thread time exceeds the model's
  price by about its host time was held up on the host, not on the device.
Times are `time.perf_counter()` seconds of the worker process. Lines go out in blocks, at most a
second apart, so logging costs a step a dictionary and no write.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

from tandem.engine.scheduler import ScheduledBatch

if TYPE_CHECKING:   # the simulator imports step_terms without the engine's torch
    from tandem.engine.llm_engine import InFlightStep

ENV = "TANDEM_STEP_LOG_DIR"
FLUSH_EVERY_S = 1.0


def step_terms(batch: ScheduledBatch) -> tuple[int, int, int, int, int]:
    """What a batch computes in the performance model's terms, read before the step advances
    its sequences: (prompt tokens, their token-weighted cached prefix, decoding sequences, their
    context tokens, tokens sampled). The simulator prices its steps from the same terms."""
    prefill = cached = decodes = context = sampled = 0
    for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        sampled += batch.samples(i)
        computed = seq.num_computed_tokens
        if num_new == 1 and computed >= seq.num_prompt_tokens:
            decodes += 1
            context += computed + 1
        else:
            prefill += num_new
            cached += num_new * computed
    return prefill, cached // prefill if prefill else 0, decodes, context, sampled


_TERMS = ("prefill_tokens", "cached_tokens", "decode_seqs", "context_tokens", "sampled")


class StepLog:
    """Collects each step's shape (`observe`, on the step thread) and times (`record`, on the
    loop) and appends them to `path` as JSON lines."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._lines: list[str] = []
        self._flushed_s = time.perf_counter()
        self._terms: tuple[int, ...] | None = None

    @classmethod
    def from_env(cls, name: str) -> StepLog | None:
        """A log at $TANDEM_STEP_LOG_DIR/<name>.jsonl, or None when the variable is unset."""
        directory = os.environ.get(ENV)
        if not directory:
            return None
        os.makedirs(directory, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return cls(os.path.join(directory, f"{safe}.jsonl"))

    def observe(self, step: InFlightStep) -> None:
        """The engine's step observer: called with each step before its tokens are applied."""
        terms = step_terms(step.batch)
        # the rows not decoding are prompts
        self._terms = (*terms, len(step.batch.seqs) - terms[2], round(step.host_s, 6))

    def record(self, began_s: float, ended_s: float, resumed_s: float) -> None:
        terms, self._terms = self._terms, None
        if terms is None:
            return   # the step thread's call found nothing to run
        self._lines.append(json.dumps({"began_s": round(began_s, 6), "ended_s": round(ended_s, 6),
                                       "resumed_s": round(resumed_s, 6),
                                       "at_s": round(time.time(), 3),
                                       **dict(zip(_TERMS + ("prefill_seqs", "host_s"), terms))}))
        if resumed_s - self._flushed_s >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            self._file.write("\n".join(self._lines) + "\n")
            self._file.flush()
            self._lines = []
        self._flushed_s = time.perf_counter()

    def close(self) -> None:
        self.flush()
        self._file.close()
