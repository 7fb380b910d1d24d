"""Decode steps queued one step ahead give exactly the tokens of steps run one at a time."""

from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams
from tandem.engine.block_manager import BlockManager
from tandem.engine.lookahead import plan_ahead
from tandem.engine.scheduler import Scheduler, SchedulerLimits
from tandem.engine.sequence import FinishReason, Sequence


def one_at_a_time(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]
                  ) -> list[list[int]]:
    """Each step scheduled only after the previous one's tokens are recorded (no step ahead)."""
    engine = llm.engine
    ids = [f"ref-{i}" for i in range(len(prompts))]
    for request_id, prompt, p in zip(ids, prompts, params):
        engine.add_request(request_id, prompt, p)
    out: dict[str, list[int]] = {request_id: [] for request_id in ids}
    while engine.has_unfinished_requests():
        for update in engine.step():
            out[update.request_id].extend(update.new_token_ids)
    return [out[request_id] for request_id in ids]


def count_ahead(llm: LLM) -> list[int]:
    calls = [0]
    launch = llm.engine.runner.launch_ahead

    def counted(*args):
        calls[0] += 1
        return launch(*args)

    llm.engine.runner.launch_ahead = counted
    return calls


PROMPTS = [[5, 9, 14, 3, 27], [8, 1, 1, 2, 40, 41, 42, 9, 9, 11, 12], [30, 31]]


@pytest.mark.parametrize("num_kv_blocks", [256, 12])  # 12: blocks run short, steps fall back
def test_generate_with_steps_ahead_equals_one_step_at_a_time(num_kv_blocks):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9)]
    llm = LLM(model="random:tiny", block_size=4, num_kv_blocks=num_kv_blocks)
    expected = one_at_a_time(llm, PROMPTS, params)
    calls = count_ahead(llm)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert got == expected
    assert [len(t) for t in got] == [3, 17, 9]
    assert calls[0] > 0
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks  # nothing leaked, ahead blocks included


def test_seeded_sampling_and_eos_ahead_equal_one_step_at_a_time():
    params = [SamplingParams(temperature=1.0, top_k=20, seed=s, max_tokens=24) for s in (1, 2, 3)]
    llm = LLM(model="random:tiny", block_size=4, num_kv_blocks=256)
    expected = one_at_a_time(llm, PROMPTS, params)
    calls = count_ahead(llm)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert got == expected and calls[0] > 0


def test_stop_string_ends_a_request_while_its_next_step_is_in_flight():
    llm = LLM(model="random:tiny", block_size=4, num_kv_blocks=256)
    free_run = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20,
                                                       ignore_eos=True))[0].outputs[0]
    stop = free_run.text[len(free_run.text) // 2:len(free_run.text) // 2 + 2]
    assert stop
    calls = count_ahead(llm)
    outputs = llm.generate([PROMPTS[1], PROMPTS[0]],
                           [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                           stop=[stop]),
                            SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)])
    stopped = outputs[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert free_run.text.startswith(stopped.text) and stop not in stopped.text
    assert len(outputs[1].outputs[0].token_ids) == 30 and calls[0] > 0
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


# ---- the plan alone, on the pure scheduler ---------------------------------------------------

def decoding(scheduler: Scheduler, num_tokens: int, name: str,
             params: SamplingParams | None = None) -> Sequence:
    params = params or SamplingParams(temperature=0, max_tokens=100)
    seq = Sequence(name, list(range(1, num_tokens + 1)), params, block_size=4)
    scheduler.add(seq)
    return seq


def run_prompts(scheduler: Scheduler):
    batch = scheduler.schedule()
    scheduler.postprocess(batch, [7] * len(batch.seqs))  # every prompt done, one token each
    return scheduler.schedule()                           # the decode step now "in flight"


def new_scheduler(num_blocks: int = 32) -> Scheduler:
    return Scheduler(SchedulerLimits(8, 64, 64), BlockManager(num_blocks, 4, True), {0})


def test_plan_reserves_the_block_the_position_ahead_needs():
    scheduler = new_scheduler()
    a = decoding(scheduler, 7, "a")   # 8 tokens with its first; the step ahead writes position 8
    b = decoding(scheduler, 2, "b")   # 3 tokens; the step ahead writes position 3
    in_flight = run_prompts(scheduler)
    assert [len(s.block_table) for s in (a, b)] == [2, 1]
    plan = plan_ahead(scheduler, in_flight, lambda n, longest: True)
    assert plan is not None and plan.rows == [0, 1]
    assert plan.batch.seqs == [a, b] and plan.batch.num_new_tokens == [1, 1]
    assert [len(s.block_table) for s in (a, b)] == [3, 1]  # a's position 8 opens a third block


def test_no_plan_while_anything_waits_prefills_or_needs_host_tokens():
    scheduler = new_scheduler()
    decoding(scheduler, 6, "a")
    in_flight = run_prompts(scheduler)
    decoding(scheduler, 3, "late")  # waits: the next step must admit it
    assert plan_ahead(scheduler, in_flight, lambda n, longest: True) is None

    scheduler = new_scheduler()
    decoding(scheduler, 6, "a", SamplingParams(temperature=0, max_tokens=9,
                                               repetition_penalty=1.2))
    in_flight = run_prompts(scheduler)
    assert plan_ahead(scheduler, in_flight, lambda n, longest: True) is None

    scheduler = new_scheduler()
    decoding(scheduler, 6, "a")
    in_flight = run_prompts(scheduler)
    assert plan_ahead(scheduler, in_flight, lambda n, longest: False) is None  # runner refuses


def test_no_plan_when_the_blocks_ahead_are_not_free():
    scheduler = new_scheduler(num_blocks=2)
    a = decoding(scheduler, 7, "a")  # 2 blocks hold its 8 tokens; position 8 needs a third
    in_flight = run_prompts(scheduler)
    assert plan_ahead(scheduler, in_flight, lambda n, longest: True) is None
    assert len(a.block_table) == 2


def test_a_sequence_ended_in_flight_is_skipped_and_the_rest_keep_their_rows():
    scheduler = new_scheduler()
    a = decoding(scheduler, 5, "a")
    b = decoding(scheduler, 5, "b")
    in_flight = run_prompts(scheduler)
    scheduler.finish(a, FinishReason.STOP)  # a stop string, found while the step runs
    plan = plan_ahead(scheduler, in_flight, lambda n, longest: True)
    assert plan is not None and plan.batch.seqs == [b] and plan.rows == [1]
    advanced = scheduler.postprocess(in_flight, [11, 12])
    assert advanced == [b] and a.num_tokens == 6 and b.token_ids[-1] == 12


def test_a_sequence_whose_token_in_flight_is_its_last_by_length_has_no_row_ahead():
    # a has 1 output token and max_tokens 2: its token in flight is its last. c reaches the
    # context limit (24) with it. When only those are left there is no step ahead at all.
    scheduler = Scheduler(SchedulerLimits(8, 64, 24), BlockManager(32, 4, True), {0})
    a = decoding(scheduler, 5, "a", SamplingParams(temperature=0, max_tokens=2))
    b = decoding(scheduler, 5, "b")
    c = decoding(scheduler, 22, "c")
    in_flight = run_prompts(scheduler)
    plan = plan_ahead(scheduler, in_flight, lambda n, longest: True)
    assert plan is not None and plan.batch.seqs == [b] and plan.rows == [1]
    scheduler.postprocess(in_flight, [11, 12, 13])
    assert a.is_finished and c.is_finished and list(scheduler.running) == [b]

    scheduler = new_scheduler()
    decoding(scheduler, 5, "a", SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    in_flight = run_prompts(scheduler)
    assert plan_ahead(scheduler, in_flight, lambda n, longest: True) is None


def test_a_step_in_flight_keeps_the_blocks_it_writes_from_being_handed_out():
    llm = LLM(model="random:tiny", block_size=4, num_kv_blocks=64)
    engine = llm.engine
    engine.add_request("a", PROMPTS[1], SamplingParams(temperature=0, max_tokens=40,
                                                       ignore_eos=True))
    steps = engine.steps(launch_before_yield=False)
    next(steps)                       # the prompt, then decode steps
    next(steps)
    next(steps)                       # now a step ahead is in flight, writing a's last block
    seq = engine.sequences["a"]
    last_block = seq.block_table[seq.num_tokens // 4]
    engine.finish_request("a")        # an abort between two steps
    manager = engine.block_manager
    assert manager.ref_counts[last_block] == 1          # still held by the step in flight
    assert last_block not in manager.allocate(manager.num_free_blocks)
    assert next(steps) == []          # the step ahead is collected, a's token dropped
    assert manager.ref_counts[last_block] == 0
    with pytest.raises(StopIteration):
        next(steps)


def test_blocks_written_by_a_prompt_chunk_and_by_a_step_ahead():
    from tandem.engine.lookahead import blocks_written
    from tandem.engine.scheduler import ScheduledBatch

    seq = Sequence("s", list(range(1, 11)), SamplingParams(), block_size=4)
    seq.block_table = [7, 3, 9, 12]
    seq.num_computed_tokens = 2                       # a chunk of 7 tokens: positions 2..8
    assert blocks_written(ScheduledBatch([seq], [7]), ahead=False) == [7, 3, 9]
    seq.num_computed_tokens = 9                       # decoding; ahead writes position 10
    assert blocks_written(ScheduledBatch([seq], [1]), ahead=False) == [9]
    assert blocks_written(ScheduledBatch([seq], [1]), ahead=True) == [9]
    seq.token_ids.extend([1, 2])                      # 12 tokens: ahead writes position 12
    assert blocks_written(ScheduledBatch([seq], [1]), ahead=True) == [12]


def launches_and_yields(engine, steps) -> list:
    """Runs `steps` to its end, recording each launch (the prompt tokens it computes) and
    each yield, in order."""
    events = []
    launch = engine.runner.launch

    def recorded(batch):
        events.append(("launch", sum(n for n in batch.num_new_tokens if n > 1)))
        return launch(batch)

    engine.runner.launch = recorded
    for _ in steps:
        events.append("yield")
    return events


def test_serving_queues_a_prompts_next_chunk_before_handing_back_the_tokens():
    # A 12-token prompt in chunks of 8 and 4, beside a decoding request: the second chunk is
    # decided (nothing added now can join it ahead of it), so it is queued before the first
    # chunk's step yields; the decode steps after the prompt keep their usual order.
    llm = LLM(model="random:tiny", block_size=4, num_kv_blocks=64, max_num_batched_tokens=9)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("d", [3, 4], params)
    engine.step()                       # "d" is decoding now
    engine.add_request("p", list(range(1, 13)), params)
    events = launches_and_yields(engine, engine.steps(launch_before_yield=False))
    assert events[:4] == [("launch", 8), ("launch", 4), "yield", "yield"]


def test_serving_queues_a_chunk_after_the_yield_when_the_step_before_decoded_nothing():
    # A prompt alone (a prefill worker's steps): its chunks relay no decoded tokens, so the next
    # chunk is scheduled after the yield, and the answer of a finished prompt is not held.
    llm = LLM(model="random:tiny", block_size=4, num_kv_blocks=64, max_num_batched_tokens=8)
    engine = llm.engine
    engine.add_request("p", list(range(1, 21)), SamplingParams(temperature=0, max_tokens=1))
    events = launches_and_yields(engine, engine.steps(launch_before_yield=False))
    assert events == [("launch", 8), "yield", ("launch", 8), "yield", ("launch", 4), "yield"]


def test_serving_without_prompt_work_schedules_after_the_yield_so_additions_join():
    llm = LLM(model="random:tiny", block_size=4, num_kv_blocks=64)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request("a", [3, 4, 5], params)
    steps = engine.steps(launch_before_yield=False)
    next(steps)                          # a's prompt; no prompt work left, nothing queued yet
    engine.add_request("b", [6, 7], params)
    batch_seen = []
    launch = engine.runner.launch
    engine.runner.launch = lambda batch: (batch_seen.append(
        [s.request_id for s in batch.seqs]), launch(batch))[1]
    next(steps)
    assert batch_seen[0] == ["a", "b"]   # b joined the step right after the yield


def test_serving_steps_with_chunks_queued_early_equal_one_step_at_a_time():
    # A 6-token budget cuts the prompts into chunks beside decodes, so chunks are queued before
    # the yield; the tokens are those of steps scheduled one at a time, and no block leaks.
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9)]
    llm = LLM(model="random:tiny", block_size=4, num_kv_blocks=64, max_num_batched_tokens=6)
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(f"s-{i}", prompt, p)
    got: dict[str, list[int]] = {f"s-{i}": [] for i in range(len(PROMPTS))}
    events = launches_and_yields(engine, (
        [got[u.request_id].extend(u.new_token_ids) for u in updates]
        for updates in engine.steps(launch_before_yield=False)))
    assert any(a != "yield" and b != "yield" for a, b in zip(events, events[1:]))  # early
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    # The reference afterwards: its prompts hit the prefix cache, which gives the same tokens.
    assert [got[f"s-{i}"] for i in range(len(PROMPTS))] == one_at_a_time(llm, PROMPTS, params)


def test_a_request_added_while_a_chunk_is_queued_early_joins_the_step_after():
    # D decodes; A's 20-token prompt runs 15 tokens beside it. That step decoded and A has 5
    # tokens left, so the next step (D and A's last 5) is queued before the step yields: B, added
    # at that yield, joins the step after it, not that one (tandem simulate models the same:
    # tests/planner/test_simulator.py).
    llm = LLM(model="random:tiny", block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("d", [3, 4, 5, 6], SamplingParams(temperature=0, max_tokens=10,
                                                         ignore_eos=True))
    engine.step()                                   # d's prompt: d decodes from now on
    engine.add_request("a", list(range(1, 21)), params)
    batches = []
    launch = engine.runner.launch
    engine.runner.launch = lambda batch: (batches.append(
        [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]), launch(batch))[1]
    steps = engine.steps(launch_before_yield=False)
    next(steps)
    engine.add_request("b", list(range(30, 38)), params)
    next(steps)
    next(steps)
    assert batches[:3] == [[("d", 1), ("a", 15)], [("d", 1), ("a", 5)],
                           [("d", 1), ("a", 1), ("b", 8)]]
