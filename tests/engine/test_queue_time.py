"""Queue time as vLLM reports it: from a request's arrival at the engine until the engine first
schedules it, carried on its updates (what workers send the frontend with the first token)."""

from __future__ import annotations

import time

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine, SequenceUpdate

GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def run_to_end(engine: LLMEngine) -> dict[str, list[SequenceUpdate]]:
    updates: dict[str, list[SequenceUpdate]] = {}
    while engine.has_unfinished_requests():
        for update in engine.step():
            updates.setdefault(update.request_id, []).append(update)
    return updates


def test_a_request_that_waits_for_a_batch_slot_reports_its_wait():
    engine = LLMEngine(EngineConfig(model="random:tiny", max_num_seqs=1, block_size=4,
                                    num_kv_blocks=64))
    engine.add_request("first", [1, 2, 3, 4, 5], GREEDY)
    engine.add_request("second", [6, 7, 8, 9], GREEDY)   # waits: one sequence per batch
    added_s = time.monotonic()
    updates: dict[str, list[SequenceUpdate]] = {}
    while "first" not in updates or not updates["first"][-1].finished:
        for update in engine.step():
            updates.setdefault(update.request_id, []).append(update)
    first_done_s = time.monotonic()
    updates.update(run_to_end(engine))
    first, second = updates["first"], updates["second"]
    assert len(first) == len(second) == 3
    # The same figure on every update of a request: it is fixed once the request is scheduled.
    assert len({u.queue_time_s for u in first}) == len({u.queue_time_s for u in second}) == 1
    # The second arrived before `added_s` and was first scheduled after `first_done_s`.
    assert second[0].queue_time_s >= first_done_s - added_s > 0
    assert first[0].queue_time_s < second[0].queue_time_s


def test_queue_time_counts_from_an_earlier_arrival_on_the_worker():
    engine = LLMEngine(EngineConfig(model="random:tiny", block_size=4, num_kv_blocks=64))
    engine.add_request("late", [1, 2, 3], GREEDY, arrival_time=time.monotonic() - 2.0)
    engine.add_request("future", [4, 5, 6], GREEDY, arrival_time=time.monotonic() + 60.0)
    updates = run_to_end(engine)
    assert 2.0 <= updates["late"][0].queue_time_s < 10.0
    # An arrival "after now" (another clock's) is taken as now: never a negative or huge wait.
    assert 0.0 <= updates["future"][0].queue_time_s < 1.0
