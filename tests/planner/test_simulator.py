"""The simulator drives the real scheduler exactly, times steps as the model says, keeps a trace's
prefix structure, releases every block, and runs without torch or grpc."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem.bench.datasets import RandomDatasetConfig, random_dataset
from tandem.bench.metrics import Summary
from tandem.bench.records import BenchRequest
from tandem.bench.trace import TraceConfig, load_trace_dataset
from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig
from tandem.engine.role_schedulers import make_scheduler
from tandem.engine.scheduler import SchedulerLimits
from tandem.engine.sequence import Sequence
from tandem.planner.sim_config import SimConfig
from tandem.planner.sim_worker import synthetic_token_cycle, synthetic_token_id
from tandem.planner.simulator import Simulator
from tandem.router.routing import RoutingConfig

BLOCK = 4


class ConstantModel:
    """Every step takes step_s, every pull transfer_s: latencies can be worked out by hand."""
    block_size = BLOCK
    kv_bytes_per_token = 8

    def __init__(self, step_s: float = 0.01, transfer_s: float = 0.005):
        self.step, self.transfer = step_s, transfer_s

    def step_s(self, *_, step_budget=None) -> float:
        return self.step

    def decode_s(self, *_) -> float:
        return self.step

    def transfer_s(self, num_bytes: int) -> float:
        return self.transfer


def config(num_prefill=0, num_decode=1, num_kv_blocks=64, budget=16, **kwargs) -> SimConfig:
    return SimConfig(num_prefill, num_decode, num_kv_blocks, 4096,
                     EngineConfig(block_size=BLOCK, max_num_batched_tokens=budget, max_num_seqs=4),
                     **kwargs)


def requests(lengths: list[tuple[int, int]], vocab: int = 50) -> list[BenchRequest]:
    return [BenchRequest(tuple(16 + (i * 7 + j) % (vocab - 16) for j in range(n_in)), n_out)
            for i, (n_in, n_out) in enumerate(lengths)]


def test_steps_match_the_real_scheduler_step_by_step():
    reqs = requests([(10, 9), (7, 12), (13, 5), (5, 20), (9, 3), (6, 15)])
    seen = []
    sim = Simulator(config(num_kv_blocks=12), ConstantModel(),
                    on_step=lambda w, b: seen.append(_snapshot(b)))
    result = sim.run(reqs, [0.0] * len(reqs))
    # The same core, driven by hand the way the engine drives it.
    manager = BlockManager(12, BLOCK)
    scheduler = make_scheduler("decode", SchedulerLimits(4, 16, 4096), manager, set())
    for i, r in enumerate(reqs):
        scheduler.add(Sequence(str(i), list(r.prompt_token_ids),
                               SamplingParams(max_tokens=r.output_len, ignore_eos=True), BLOCK))
    expected = []
    while scheduler.has_work():
        batch = scheduler.schedule()
        expected.append(_snapshot(batch))
        scheduler.postprocess(batch, [synthetic_token_id(s.num_tokens, 2000)
                                      if s.num_computed_tokens + n == s.num_tokens else None
                                      for s, n in zip(batch.seqs, batch.num_new_tokens)])
    assert scheduler.num_preemptions > 0  # the small cache exercises preemption too
    assert seen == expected
    assert [r.output_tokens for r in result.records()] == [r.output_len for r in reqs]


def test_advancing_decode_stretches_at_once_changes_nothing():
    reqs = requests([(10, 9), (7, 30), (13, 25), (5, 40), (9, 3), (6, 35), (10, 28)])
    offsets = [0.0, 0.0, 0.01, 0.02, 0.05, 0.3, 0.31]
    runs = []
    for hook in (None, lambda worker, batch: None):  # a hook sees every step: one at a time
        sim = Simulator(config(1, 2, num_kv_blocks=40,
                               routing=RoutingConfig(remote_prefill_min_tokens=8)),
                        ConstantModel(), on_step=hook)
        result = sim.run(reqs, offsets)
        managers = [(list(w.block_manager.free_queue), w.block_manager.hash_to_block,
                     w.block_manager.next_event_id) for w in sim.workers.values()]
        runs.append(([(r.token_times_s, r.cached_tokens) for r in result.requests], managers,
                     sim.router.indexes["decode"].overlaps(sim.requests[1].block_hashes)))
    assert runs[0] == runs[1]


def test_the_step_log_lists_every_step_collapsed_or_not():
    # Stretches are logged step by step: the log is the same whether decode steps collapse.
    reqs = requests([(10, 9), (7, 30), (13, 25), (5, 40), (9, 3), (6, 35), (10, 28)])
    offsets = [0.0, 0.0, 0.01, 0.02, 0.05, 0.3, 0.31]
    logs = []
    for collapse in (True, False):
        sim = Simulator(config(0, 2, num_kv_blocks=40, record_steps=True,
                               collapse_decode_steps=collapse), ConstantModel())
        sim.run(reqs, offsets)
        logs.append({wid: w.step_log for wid, w in sim.workers.items()})
        for worker in sim.workers.values():
            assert len(worker.step_log) == worker.num_steps
            assert all(line["ended_s"] == pytest.approx(line["began_s"] + 0.01)
                       for line in worker.step_log)
    assert logs[0] == logs[1]
    first = logs[0]["decode-0"][0]   # the first request's prompt, alone on its worker
    assert (first["prefill_tokens"], first["decode_seqs"], first["sampled"]) == (10, 0, 1)
    assert first["prefill_seqs"] == 1
    assert all((line["prefill_seqs"] > 0) == (line["prefill_tokens"] > 0)
               for log in logs[0].values() for line in log)


def _snapshot(batch):
    return [(s.request_id, n, tuple(s.block_table)) for s, n in zip(batch.seqs,
                                                                    batch.num_new_tokens)]


def test_aggregated_timing_is_the_models():
    reqs = requests([(10, 4)])
    record = Simulator(config(), ConstantModel()).run(reqs, [0.5]).records()[0]
    assert record.start_s == 0.5
    assert record.ttft_ms == pytest.approx(10.0)
    assert record.itl_ms == pytest.approx((10.0, 10.0, 10.0))
    assert record.e2e_ms == pytest.approx(40.0)


def test_serving_overheads_reach_every_step_of_a_decode_stretch():
    # Two requests decode side by side: after the shared prefill step, 7 identical decode steps
    # run as one stretch; each must cost step + 2 sequences x token overhead, like a single step
    # (the prompt step pays the step overhead, and per prompt token instead of per sampled one).
    reqs = requests([(6, 8), (6, 8)])
    for collapse in (True, False):
        sim = Simulator(config(step_overhead_s=0.002, token_overhead_s=0.0005,
                               collapse_decode_steps=collapse), ConstantModel())
        records = sim.run(reqs, [0.0, 0.0]).records()
        assert records[0].ttft_ms == pytest.approx(12.0)  # 10 + 2
        assert records[0].itl_ms == pytest.approx((13.0,) * 7)
        assert records[1].itl_ms == records[0].itl_ms


def test_each_prompt_past_the_first_in_a_step_adds_its_overhead():
    # Three 4-token prompts arrive together and share the first step (budget 16): it costs the
    # model's 10 ms, the step overhead and two extra prompts; their decode steps pay per token.
    reqs = requests([(4, 2), (4, 2), (4, 2)])
    sim = Simulator(config(step_overhead_s=0.001, extra_prompt_overhead_s=0.003,
                           token_overhead_s=0.0005), ConstantModel())
    records = sim.run(reqs, [0.0] * 3).records()
    assert [r.ttft_ms for r in records] == pytest.approx([17.0] * 3)   # 10 + 1 + 2 x 3
    assert records[0].itl_ms == pytest.approx((12.5,))   # 10 + 1 + 3 x 0.5
    alone = Simulator(config(step_overhead_s=0.001, extra_prompt_overhead_s=0.003),
                      ConstantModel()).run(reqs[:1], [0.0]).records()[0]
    assert alone.ttft_ms == pytest.approx(11.0)


def test_an_operation_in_a_steady_decode_step_waits_for_the_step_queued_ahead():
    # A decodes alone in 10 ms steps from t=10; B arrives at 15, during the step 10-20. The
    # engine has queued 20-30 before it applies B's arrival, so B's first chunk runs 30-40.
    reqs = requests([(6, 20), (6, 4)])
    for collapse in (True, False):
        for lookahead, ttft_ms in ((True, 25.0), (False, 15.0)):
            sim = Simulator(config(decode_lookahead=lookahead, collapse_decode_steps=collapse),
                            ConstantModel())
            records = sim.run(reqs, [0.0, 0.015]).records()
            assert records[1].ttft_ms == pytest.approx(ttft_ms)
            assert records[0].output_tokens == 20


def test_a_handoff_starts_its_pull_at_once_and_joins_the_step_after_it():
    # A decodes alone on the decode worker in 10 ms steps (15-25, 25-35, ...). B is prefilled
    # 20-30; its hand-over reaches the decode worker during 25-35. At 35 the pull starts (35-40)
    # whatever runs next (35-45, queued ahead before B was parked); while B is parked nothing is
    # queued behind it, so the completed pull brings B into the step 45-55: B's second token at
    # 55, 25 ms after its first, as on a worker that never queues a step ahead.
    routing = RoutingConfig(remote_prefill_min_tokens=4)
    reqs = requests([(10, 12), (10, 3)])
    for collapse in (True, False):
        for lookahead in (True, False):
            sim = Simulator(config(1, 1, routing=routing, decode_lookahead=lookahead,
                                   collapse_decode_steps=collapse), ConstantModel())
            records = sim.run(reqs, [0.0, 0.020]).records()
            assert records[1].ttft_ms == pytest.approx(10.0)
            assert records[1].itl_ms[0] == pytest.approx(25.0)


def test_a_prefill_answer_waits_for_the_workers_next_step_boundary():
    routing = RoutingConfig(remote_prefill_min_tokens=4)
    # Two-chunk prompts: A's answer is held behind B's first chunk's launch (3 ms); B's goes at
    # once, the worker then idle. A first chunk costs 10 + 2 ms, a second one (after a step that
    # sampled nothing, which the engine does not wait for) 10.
    sim = Simulator(config(1, 1, routing=routing, chunk_overhead_s=0.002, chunk_launch_s=0.003,
                           answer_at_step_boundary=True),
                    ConstantModel())
    first, second = sim.run(requests([(32, 2), (32, 2)]), [0.0, 0.001]).records()
    assert first.ttft_ms == pytest.approx(22.0 + 3.0)
    assert second.ttft_ms == pytest.approx(44.0 - 1.0)
    # One-chunk prompts: the next step samples, so A's answer waits for all of it.
    sim = Simulator(config(1, 1, routing=routing, chunk_launch_s=0.003,
                           answer_at_step_boundary=True), ConstantModel())
    first, second = sim.run(requests([(16, 2), (16, 2)]), [0.0, 0.001]).records()
    assert first.ttft_ms == pytest.approx(20.0)
    assert second.ttft_ms == pytest.approx(19.0)


def test_a_prefill_answer_leaves_as_its_step_ends():
    routing = RoutingConfig(remote_prefill_min_tokens=4)
    sim = Simulator(config(1, 1, routing=routing, chunk_overhead_s=0.002, chunk_launch_s=0.003),
                    ConstantModel())
    first, second = sim.run(requests([(32, 2), (32, 2)]), [0.0, 0.001]).records()
    assert first.ttft_ms == pytest.approx(22.0)   # chunk steps of 10 + 2 and 10 ms
    assert second.ttft_ms == pytest.approx(44.0 - 1.0)


def test_tokens_wait_behind_the_launch_of_a_next_step_with_prompt_tokens():
    # prompt_launch_s: after a step that decoded, a worker with prompt tokens left queues the
    # next step before it hands back the tokens (LLMEngine.steps). D (4-token prompt) is
    # prefilled 0-10; A's 32 tokens then run beside D's decodes in 10 ms steps: 15 (10-20), 15
    # (20-30), 2 (30-40, A samples). D's tokens of the steps ending at 20 and 30 are followed by
    # A's chunks, so they leave 3 ms late; the one at 40 is followed by decodes only. D's prompt
    # step decoded nothing, so its first token leaves at 10.
    for launch_s, itl_ms in ((0.0, (10.0, 10.0, 10.0)), (0.003, (13.0, 10.0, 7.0))):
        sim = Simulator(config(prompt_launch_s=launch_s), ConstantModel())
        d, a = sim.run(requests([(4, 8), (32, 2)]), [0.0, 0.001]).records()
        assert d.ttft_ms == pytest.approx(10.0)
        assert d.itl_ms[:3] == pytest.approx(itl_ms) and d.itl_ms[3:] == pytest.approx((10.0,) * 4)
        assert a.ttft_ms == pytest.approx(39.0)
    # A prefill worker's steps decode nothing: its answers leave as the step ends.
    routing = RoutingConfig(remote_prefill_min_tokens=4)
    sim = Simulator(config(1, 1, routing=routing, chunk_overhead_s=0.002,
                           prompt_launch_s=0.003), ConstantModel())
    first, second = sim.run(requests([(32, 2), (32, 2)]), [0.0, 0.001]).records()
    assert first.ttft_ms == pytest.approx(22.0)
    assert second.ttft_ms == pytest.approx(44.0 - 1.0)


def test_an_arrival_joins_a_step_later_when_the_next_chunk_was_queued_first():
    # D decodes; A's 20-token prompt runs 15 tokens beside it (10-20), B arrives at 15. After a
    # step that decoded, with A's 5 tokens left, the engine queues the next step (20-30: D and
    # A) before it applies B's arrival, so B runs 30-40 (TTFT 25 ms). Scheduled after the
    # arrival, as serving did before, B's 8 tokens fit beside them at 20 (TTFT 15 ms).
    for early, b_ttft_ms in ((True, 25.0), (False, 15.0)):
        for collapse in (True, False):
            sim = Simulator(config(queue_prompts_early=early, collapse_decode_steps=collapse),
                            ConstantModel())
            d, a, b = sim.run(requests([(4, 12), (20, 3), (8, 3)]),
                              [0.0, 0.001, 0.015]).records()
            assert (d.ttft_ms, a.ttft_ms) == (pytest.approx(10.0), pytest.approx(29.0))
            assert b.ttft_ms == pytest.approx(b_ttft_ms)


def test_a_chunk_queued_before_the_hand_back_pays_no_launch_of_its_own():
    # Every prompt step scheduled after the hand-back pays the 2 ms chunk overhead: D's prompt
    # (0-12), then A's first 15 tokens beside D's decode (12-24). A's last 5 tokens were queued
    # before the hand-back of that step, their host work done under it: 24-34, A's TTFT 33 ms.
    # Scheduled after the hand-back, as serving did before, they pay it too: 24-36.
    for early, a_ttft_ms in ((True, 33.0), (False, 35.0)):
        sim = Simulator(config(queue_prompts_early=early, chunk_overhead_s=0.002),
                        ConstantModel())
        d, a = sim.run(requests([(4, 12), (20, 3)]), [0.0, 0.001]).records()
        assert d.ttft_ms == pytest.approx(12.0)
        assert a.ttft_ms == pytest.approx(a_ttft_ms)


def test_an_arrival_in_a_steady_decode_is_in_the_scheduler_when_the_step_queued_ahead_ends():
    # D's prompt 0-12 (the 2 ms chunk overhead), then D decodes steadily. A arrives at 25, during
    # 22-32; the step queued ahead (32-42) runs first and the loop adds A meanwhile, so when it
    # ends A's prompt waits: the engine queues the next step (42-52, D and A's 8 tokens) before
    # it hands back D's token, 3 ms later (prompt_launch_s), and that step pays no chunk
    # overhead. A's TTFT is 27 ms.
    for collapse in (True, False):
        sim = Simulator(config(chunk_overhead_s=0.002, prompt_launch_s=0.003,
                               collapse_decode_steps=collapse), ConstantModel())
        d, a = sim.run(requests([(4, 12), (8, 3)]), [0.0, 0.025]).records()
        assert a.ttft_ms == pytest.approx(27.0)
        assert d.ttft_ms == pytest.approx(12.0)
        assert d.itl_ms[:4] == pytest.approx((10.0, 10.0, 13.0, 7.0))


def test_a_step_pays_the_serving_overhead_of_each_prompt_token_it_carries():
    routing = RoutingConfig(remote_prefill_min_tokens=4)
    # 24 prompt tokens in chunks of 16 and 8: 10 ms a step, 0.5 ms a token, and 1 ms for the
    # first chunk (after an idle worker); the second follows a step that sampled nothing, whose
    # device work the loop's overlaps.
    sim = Simulator(config(1, 1, routing=routing, chunk_overhead_s=0.001,
                           prefill_token_overhead_s=0.0005), ConstantModel())
    record = sim.run(requests([(24, 2)]), [0.0]).records()[0]
    assert record.ttft_ms == pytest.approx(2 * 10.0 + 1.0 + 24 * 0.5)


def test_disaggregated_timing_adds_the_pull_and_the_hops():
    reqs = requests([(10, 4)])
    sim = Simulator(config(1, 1, rpc_s=0.001, routing=RoutingConfig(remote_prefill_min_tokens=4)),
                    ConstantModel())
    record = sim.run(reqs, [0.0]).records()[0]
    # prefill reaches its worker after 1 ms, steps 10 ms, answers after 1 ms: first token at 12;
    # the decode worker gets it at 13, pulls 5 ms, decodes 10 ms, the token arrives 1 ms later.
    assert record.ttft_ms == pytest.approx(12.0)
    assert record.itl_ms == pytest.approx((17.0, 10.0, 10.0))
    assert sim.num_remote_prefills == 1


def test_disaggregated_blocks_are_pinned_then_released_and_nothing_leaks():
    reqs = random_dataset(RandomDatasetConfig(num_requests=40, input_len=40, output_len=8,
                                              range_ratio=0.5, vocab_size=60), seed=1)
    pinned = []

    def watch(worker, batch):
        pinned.extend(w.scheduler.num_pinned_requests for w in sim.workers.values()
                      if w.role == "prefill")

    sim = Simulator(config(2, 2, num_kv_blocks=48, routing=RoutingConfig(
        remote_prefill_min_tokens=8)), ConstantModel(), on_step=watch)
    result = sim.run(reqs, [0.002 * i for i in range(len(reqs))])
    assert max(pinned) > 0
    assert sim.num_remote_prefills > 0
    assert all(r.is_ok for r in result.records())
    assert result.stats()["leaked_workers"] == []
    for worker in sim.workers.values():
        assert worker.block_manager.num_free_blocks == worker.block_manager.num_blocks


def test_trace_replays_with_its_prefix_structure(tmp_path):
    rows = [{"timestamp": 1000 * i, "input_length": 2 * 8 + 3, "output_length": 3,
             "hash_ids": ids} for i, ids in enumerate([[1, 2, 3], [1, 2, 4], [1, 5, 6], [1, 2, 3],
                                                       [7, 8, 9], [7, 8, 1]])]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reqs = load_trace_dataset(TraceConfig(str(path), trace_block_size=8, vocab_size=60), 0)
    result = Simulator(config(num_kv_blocks=256), ConstantModel()).run(
        reqs, [r.arrival_offset_s for r in reqs])
    summary = result.summary({})
    assert summary["prefix_hit_rate"] > 0
    assert summary["prefix_hit_rate"] == pytest.approx(summary["ideal_prefix_hit_rate"])
    assert set(summary) == set(Summary.__dataclass_fields__)


def test_simulator_and_planner_run_with_torch_and_grpc_blocked(tmp_path):
    code = f"""
import sys
sys.modules['torch'] = None
sys.modules['grpc'] = None
import json
from tandem.planner.sim_synthetic import synthetic_profile
json.dump(synthetic_profile(num_kv_blocks=2000, max_model_len=4096), open({str(tmp_path / 'p.json')!r}, 'w'))
from tandem.planner import simulate_cli, plan_cli
assert simulate_cli.main(['--profile', {str(tmp_path / 'p.json')!r}, '--num-requests', '20',
                          '--input-len', '300', '--output-len', '8', '--request-rate', '4',
                          '--out', {str(tmp_path / 's.json')!r}]) == 0
assert plan_cli.main(['--profile', {str(tmp_path / 'p.json')!r}, '--gpus', '2', '--num-requests',
                      '10', '--input-len', '300', '--output-len', '8', '--slo', 'ttft_ms=500',
                      '--max-requests-per-probe', '10', '--chunk-sizes', '512']) == 0
assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "num_requests" in json.loads((tmp_path / "s.json").read_text())


def test_the_token_cycle_gives_the_synthetic_token_at_every_position():
    cycle = synthetic_token_cycle(50)
    assert len(cycle) == 2 * (50 - 16)
    for n in range(0, 500, 7):
        start = n % (50 - 16)
        assert cycle[start:start + 30] == [synthetic_token_id(n + k, 50) for k in range(30)]
