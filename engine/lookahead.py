"""One decode step ahead: the next step is queued on the device before this one's tokens are read.

A decode step's host work (scheduling, building inputs, launching the graph, reading the sampled
tokens back, recording them) otherwise leaves the device idle between steps. When every running
sequence is decoding and nothing waits, the next step is already known but for its input tokens,
which are this step's sampled tokens, still on the device: it is planned from the sequences as they
will be once this step's tokens are recorded (one position further on), with its inputs read from
the device tensor of this step's tokens. A sequence whose token in this step is its last by length
(max_tokens, the context limit) has no row in the step ahead, and when that is every sequence there
is no step ahead. One that this step ends otherwise (eos, a stop token or string) still has a row;
its token there is dropped (the scheduler skips finished sequences when recording).

No step is queued ahead while a handed-over request waits for its prompt's KV pull (decode role):
the pull starts at a step boundary and usually ends within the next step, and a step queued ahead
of that boundary would make the request wait one step more before it joins. Its first gap is the
longest of its gaps (the one a gap SLO catches), and one step of host work left unhidden is cheaper.

Blocks for the position ahead are reserved here, never by preempting: when the free blocks do not
cover them, there is no step ahead and the next step is scheduled as usual.

Pure: decides on the scheduler's sequences and reserves blocks; the model runner launches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tandem.engine.scheduler import ScheduledBatch, Scheduler
from tandem.engine.stop_rule import ends_by_length


@dataclass(slots=True)
class AheadPlan:
    # The running sequences that go on past this step, one token each, a position further on.
    batch: ScheduledBatch
    rows: list[int]        # each sequence's row in the step in flight, whose token is its input


def plan_ahead(scheduler: Scheduler, in_flight: ScheduledBatch,
               fits: Callable[[int, int], bool]) -> AheadPlan | None:
    """The step after `in_flight` (queued, its tokens not yet recorded), or None when it cannot be
    known now. `fits(num_seqs, max_seq_len)` says whether the runner can launch such a step ahead.
    Reserves the step's blocks when it returns a plan."""
    running = scheduler.running
    if scheduler.waiting or scheduler.waiting_for_remote_kvs or not running:
        return None
    row_of = {id(seq): i for i, seq in enumerate(in_flight.seqs)}
    seqs, rows = [], []
    num_needed = 0
    longest = 0
    max_model_len = scheduler.limits.max_model_len
    for seq in running:
        i = row_of.get(id(seq))
        # Each must decode one token in the step in flight (so it samples there), and nothing may
        # need its tokens on the host before sampling (a grammar, penalties, min_tokens).
        if (i is None or in_flight.num_new_tokens[i] != 1
                or seq.num_computed_tokens + 1 != seq.num_tokens
                or seq.grammar is not None or seq.params.changes_logits):
            return None
        if ends_by_length(seq.params, seq.num_output_tokens + 1, seq.num_tokens + 1,
                          max_model_len):
            continue   # its token in flight is its last
        seqs.append(seq)
        rows.append(i)
        # After this step it holds num_tokens + 1 tokens, the last of which the step ahead computes.
        num_needed += max(0, seq.num_blocks_for(seq.num_tokens + 1) - len(seq.block_table))
        longest = max(longest, seq.num_tokens + 1)
    if not seqs or not fits(len(seqs), longest):
        return None
    manager = scheduler.block_manager
    if num_needed and not manager.can_allocate(num_needed):
        return None
    for seq in seqs:
        missing = seq.num_blocks_for(seq.num_tokens + 1) - len(seq.block_table)
        if missing > 0:
            seq.block_table.extend(manager.allocate(missing))
    return AheadPlan(ScheduledBatch(seqs, [1] * len(seqs)), rows)


def queues_before_hand_back(scheduler: Scheduler, finished: ScheduledBatch) -> bool:
    """Whether a serving worker queues the step after `finished` (its tokens just recorded)
    before it hands back those tokens and applies what arrived meanwhile (LLMEngine.steps): when
    that step decoded (one-token rows: tokens for the loop to relay) and prompt tokens are left
    to compute, whose next chunk a request added now could only queue behind."""
    return 1 in finished.num_new_tokens and scheduler.has_prompt_work()


def blocks_written(batch: ScheduledBatch, ahead: bool) -> list[int]:
    """The blocks a step writes K/V into: each sequence's new tokens' blocks (`ahead`: the one
    block of the position past its last recorded token)."""
    written = []
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        table, size = seq.block_table, seq.block_size
        first = (seq.num_tokens if ahead else seq.num_computed_tokens) // size
        last = first if ahead else (seq.num_computed_tokens + num_new - 1) // size
        written.extend(table[first:last + 1])
    return written
