"""Scheduler.advance_decode: k decode steps at once, exactly as k rounds of schedule/postprocess."""

from __future__ import annotations

from tandem.contracts.kv_events import BlockRemoved, BlockStored
from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.block_manager import BlockManager
from tandem.engine.role_schedulers import make_scheduler
from tandem.engine.scheduler import SchedulerLimits
from tandem.engine.sequence import FinishReason, Sequence

BLOCK = 4
EOS = 0


def token_after(num_tokens: int) -> int:
    """The token a sequence of num_tokens samples next: a fixed function, never eos."""
    return 1 + (num_tokens * 7) % 29


def next_tokens(seq: Sequence, num_steps: int) -> list[int]:
    return [token_after(n) for n in range(seq.num_tokens, seq.num_tokens + num_steps)]


def make(num_blocks: int, role: str = "both"):
    manager = BlockManager(num_blocks, BLOCK)
    events = []
    manager.subscribe(events.append)
    limits = SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=64)
    return make_scheduler(role, limits, manager, {EOS}), manager, events


def step(scheduler) -> None:
    batch = scheduler.schedule()
    scheduler.postprocess(batch, [token_after(s.num_tokens) if batch.samples(i) else None
                                  for i, s in enumerate(batch.seqs)])


def prefill(scheduler, prompts: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    seqs = {rid: Sequence(rid, list(tokens), params, BLOCK)
            for rid, (tokens, params) in prompts.items()}
    for s in seqs.values():
        scheduler.add(s)
    step(scheduler)
    return seqs


def state(scheduler, manager, events, seqs) -> tuple:
    return ([(s.token_ids, s.block_table, s.block_hashes, s.num_computed_tokens,
              s.num_hashed_blocks_cached, s.status, s.finish_reason) for s in seqs.values()],
            list(manager.free_queue), manager.hash_to_block, manager.ref_counts, events,
            [s.request_id for s in scheduler.running])


def test_blocks_are_taken_and_evicted_as_step_by_step_would():
    scheduler, manager, events = make(num_blocks=6)
    old = prefill(scheduler, {"old": (list(range(1, 9)), SamplingParams(max_tokens=1))})["old"]
    assert old.finish_reason == FinishReason.LENGTH  # free queue now 2, 3, 4, 5, then 1, 0
    old_hashes = list(old.block_hashes)
    seqs = prefill(scheduler, {
        "a": (list(range(40, 45)), SamplingParams(max_tokens=20, ignore_eos=True)),
        "b": (list(range(50, 57)), SamplingParams(max_tokens=20, ignore_eos=True))})
    assert [s.block_table for s in seqs.values()] == [[2, 3], [4, 5]]
    del events[:]
    assert scheduler.advance_decode(5, next_tokens) == 5
    # b (8 tokens) needs a block at step 2, a (6 tokens) at step 4; each evicts the old prompt's
    # cached blocks, its tail first.
    assert seqs["a"].block_table == [2, 3, 0]
    assert seqs["b"].block_table == [4, 5, 1]
    removed = [e.block_hashes for e in events if isinstance(e, BlockRemoved)]
    assert removed == [(old_hashes[1],), (old_hashes[0],)]
    assert [s.num_tokens for s in seqs.values()] == [11, 13]


def twins(num_blocks: int, prompts) -> tuple:
    made = []
    for _ in range(2):
        scheduler, manager, events = make(num_blocks)
        prefill(scheduler, {"warm": (list(range(100, 113)), SamplingParams(max_tokens=1))})
        seqs = prefill(scheduler, prompts)
        del events[:]
        made.append((scheduler, manager, events, seqs))
    return made


def test_same_state_and_events_as_stepping_until_the_first_finish():
    prompts = {
        "a": (list(range(1, 7)), SamplingParams(max_tokens=30)),
        "b": (list(range(1, 7)), SamplingParams(max_tokens=30)),   # shares a's blocks' hashes
        "c": (list(range(60, 71)), SamplingParams(max_tokens=9)),  # ends first, by length
    }
    (bulk, bulk_manager, bulk_events, bulk_seqs), stepped = twins(40, prompts)
    assert bulk.advance_decode(20, next_tokens) == 8  # c's ninth output token is step 8
    scheduler, manager, events, seqs = stepped
    for _ in range(8):
        step(scheduler)
    assert seqs["c"].is_finished and not seqs["a"].is_finished
    assert (state(bulk, bulk_manager, bulk_events, bulk_seqs)
            == state(scheduler, manager, events, seqs))
    assert any(isinstance(e, BlockStored) for e in events)


def test_a_stop_token_ends_the_run_at_its_step():
    stop = token_after(9)  # what a 9-token sequence samples: a's third decode step
    prompts = {"a": (list(range(1, 7)), SamplingParams(max_tokens=30, stop_token_ids=[stop])),
               "b": (list(range(20, 29)), SamplingParams(max_tokens=30, min_tokens=30,
                                                         stop_token_ids=[stop]))}
    (bulk, bulk_manager, bulk_events, bulk_seqs), stepped = twins(40, prompts)
    num_steps = bulk.advance_decode(20, next_tokens)
    scheduler, manager, events, seqs = stepped
    for _ in range(num_steps):
        step(scheduler)
    assert num_steps == 3 and bulk_seqs["a"].stop_reason == stop
    assert not bulk_seqs["b"].is_finished  # min_tokens keeps b's stop token from ending it
    assert (state(bulk, bulk_manager, bulk_events, bulk_seqs)
            == state(scheduler, manager, events, seqs))


def test_nothing_is_done_unless_the_batch_is_pure_decode_with_blocks_to_spare():
    scheduler, manager, _ = make(num_blocks=40)
    prefill(scheduler, {"a": (list(range(1, 7)), SamplingParams(max_tokens=30))})
    scheduler.add(Sequence("w", [1, 2, 3], SamplingParams(max_tokens=4), BLOCK))
    assert scheduler.advance_decode(5, next_tokens) == 0  # a request waits
    scheduler, manager, _ = make(num_blocks=3)
    seqs = prefill(scheduler, {"a": (list(range(1, 7)), SamplingParams(max_tokens=30))})
    assert scheduler.advance_decode(10, next_tokens) == 0  # needs 2 more blocks, 1 is free
    assert seqs["a"].num_tokens == 7 and manager.num_free_blocks == 1
