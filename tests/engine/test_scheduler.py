"""Scheduler: token budget, chunked prefill, prefix hits, max_num_seqs, preemption and roles."""

from __future__ import annotations

import pytest

from tandem.engine.block_manager import BlockManager
from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.role_schedulers import PrefillScheduler, make_scheduler
from tandem.engine.scheduler import SchedulerLimits
from tandem.engine.sequence import FinishReason, Sequence, SequenceStatus

BLOCK = 4
EOS = 0


def make(num_blocks=16, max_seqs=8, budget=32, role="both"):
    limits = SchedulerLimits(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                             max_model_len=64)
    manager = BlockManager(num_blocks, BLOCK)
    return make_scheduler(role, limits, manager, {EOS}), manager


def seq(rid: str, n: int, start: int = 1, max_tokens: int = 8) -> Sequence:
    return Sequence(rid, list(range(start, start + n)),
                    SamplingParams(max_tokens=max_tokens, temperature=0), BLOCK)


def run_step(scheduler, token=7):
    batch = scheduler.schedule()
    sampled = [token if batch.samples(i) else None for i in range(len(batch.seqs))]
    scheduler.postprocess(batch, sampled)
    return batch


def test_chunked_prefill_respects_the_token_budget():
    scheduler, _ = make(budget=8)
    s = seq("a", 10)
    scheduler.add(s)
    batch = run_step(scheduler)
    assert batch.num_new_tokens == [8] and not batch.samples(0)
    assert s.num_computed_tokens == 8 and s.block_table == [0, 1]
    batch = run_step(scheduler)
    assert batch.num_new_tokens == [2] and s.num_output_tokens == 1
    assert s.block_table == [0, 1, 2]


def test_decodes_go_first_then_waiting_prompts_fill_the_budget():
    scheduler, _ = make(budget=6)
    a, b = seq("a", 3), seq("b", 9, start=50)
    scheduler.add(a)
    run_step(scheduler)          # a: prompt done, first token out
    scheduler.add(b)
    batch = scheduler.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [1, 5]


def test_max_num_seqs_limits_admission():
    scheduler, _ = make(max_seqs=2)
    for name in "abc":
        scheduler.add(seq(name, 3, start=ord(name)))
    batch = scheduler.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"]
    assert len(scheduler.waiting) == 1


def test_prefix_cache_hit_skips_computed_blocks_but_recomputes_the_last_token():
    scheduler, manager = make()
    first = seq("a", 9, max_tokens=1)
    scheduler.add(first)
    run_step(scheduler)
    assert first.is_finished and manager.num_used_blocks == 0
    same_prefix = seq("b", 9)
    scheduler.add(same_prefix)
    batch = scheduler.schedule()
    assert same_prefix.num_cached_prompt_tokens == 8
    assert batch.num_new_tokens == [1]
    assert same_prefix.block_table[:2] == first_blocks(manager, first)
    whole_blocks = seq("c", 8)
    scheduler.add(whole_blocks)
    batch = scheduler.schedule()
    assert batch.num_new_tokens[-1] == 4  # all 8 cached, the last block is computed again


def first_blocks(manager: BlockManager, s: Sequence) -> list[int]:
    return manager.match_prefix(s.block_hashes)


def test_preemption_frees_the_newest_sequence_and_recomputes_it():
    scheduler, manager = make(num_blocks=4, budget=64)
    a, b = seq("a", 7, max_tokens=5), seq("b", 7, start=30, max_tokens=5)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)  # each holds 2 blocks: 7 prompt tokens + 1 computed next step
    assert manager.num_free_blocks == 0
    run_step(scheduler)  # position 7 still fits in block 2
    run_step(scheduler)  # a needs a 3rd block for position 8: b, the newest, is preempted
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert scheduler.num_preemptions == 1 and scheduler.waiting[0] is b
    assert a.num_output_tokens == 3 and len(a.block_table) == 3
    while not a.is_finished:
        run_step(scheduler)
    batch = run_step(scheduler)
    # b had 9 tokens; its first block is still cached, so 5 are recomputed and a 10th sampled
    assert batch.seqs == [b] and batch.num_new_tokens == [5]
    assert b.num_tokens == 10 and b.num_output_tokens == 3


def test_stop_conditions():
    scheduler, manager = make()
    s = seq("a", 3, max_tokens=5)
    scheduler.add(s)
    run_step(scheduler, token=EOS)
    assert s.finish_reason == FinishReason.STOP and manager.num_used_blocks == 0
    t = seq("b", 3, max_tokens=2)
    scheduler.add(t)
    run_step(scheduler)
    run_step(scheduler)
    assert t.finish_reason == FinishReason.LENGTH and t.num_output_tokens == 2


def test_prompt_longer_than_the_context_is_refused():
    scheduler, _ = make()
    with pytest.raises(ValueError, match="64 tokens"):
        scheduler.add(seq("a", 64))


def test_prefill_role_pins_blocks_until_released():
    scheduler, manager = make(role="prefill")
    assert isinstance(scheduler, PrefillScheduler)
    s = seq("a", 6)
    scheduler.add(s)
    run_step(scheduler)
    assert s.finish_reason == FinishReason.REMOTE_DECODE and s.num_output_tokens == 1
    assert scheduler.pinned == {"a": [0, 1]} and manager.num_used_blocks == 2
    assert scheduler.release_pinned("a") is True
    assert manager.num_used_blocks == 0 and scheduler.release_pinned("a") is False


def test_abort_frees_blocks():
    scheduler, manager = make()
    s = seq("a", 6)
    scheduler.add(s)
    run_step(scheduler)
    scheduler.finish(s, FinishReason.ABORT)
    assert manager.num_used_blocks == 0 and not scheduler.has_work()


def test_a_sequence_alone_that_outgrows_the_cache_finishes_instead_of_looping():
    scheduler, manager = make(num_blocks=2, budget=64)
    s = seq("a", 6, max_tokens=20)
    scheduler.add(s)
    for _ in range(10):
        run_step(scheduler)
    assert s.finish_reason == FinishReason.LENGTH and s.num_tokens == 9  # 8 fit, the 9th sampled
    assert manager.num_used_blocks == 0 and not scheduler.has_work()


def test_prompt_larger_than_the_whole_cache_is_refused():
    scheduler, _ = make(num_blocks=2)
    with pytest.raises(ValueError, match="KV cache has 2"):
        scheduler.add(seq("a", 8))


def test_a_pulled_request_decodes_ahead_of_a_long_local_prefill():
    # A decode worker prefilling a long prompt itself: a request whose KV arrives meanwhile
    # decodes from the next step on, not after the prompt's last chunk.
    scheduler, _ = make(num_blocks=32, budget=8, role="decode")
    local = seq("local", 40, max_tokens=2)
    scheduler.add(local)
    run_step(scheduler)                                   # 8 of its 40 prompt tokens
    remote = seq("remote", 6, start=100, max_tokens=8)
    assert scheduler.add_remote(remote, first_token_id=9) == (0, [2, 3])
    scheduler.complete_remote("remote", succeeded=True)
    for step in range(4):                                 # the prompt's next four chunks
        batch = run_step(scheduler)
        assert batch.seqs == [remote, local] and batch.num_new_tokens == [1, 7], step
    assert remote.num_output_tokens == 5 and local.num_computed_tokens == 36
    # running order is also preemption order (the last makes room first): the prompt goes first
    assert scheduler.running == [remote, local]
