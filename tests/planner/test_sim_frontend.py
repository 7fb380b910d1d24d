"""The frontend's shared token ceiling (planner/sim_frontend.py) alone and inside the simulator."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from tandem.engine.config import EngineConfig
from tandem.planner.sim_config import SimConfig
from tandem.planner.sim_frontend import SharedFrontend
from tandem.planner.sim_synthetic import synthetic_profile
from tandem.planner.simulate_cli import add_simulate_arguments, load_profile, sim_config_from_args
from tandem.planner.simulator import Simulator
from tandem.router.kv_policy import KVPolicyConfig, RouterMode
from tandem.router.routing import RoutingConfig

from tests.planner.test_simulator import BLOCK, ConstantModel, requests

ROUND_ROBIN = RoutingConfig(policy=KVPolicyConfig(mode=RouterMode.ROUND_ROBIN))


class BatchModel(ConstantModel):
    """Steps that grow with the batch, so that workers with different batches drift apart."""

    def step_s(self, num_prefill, cached, num_decode, num_context) -> float:
        return 0.004 + 0.0003 * num_prefill + 0.001 * num_decode + 1e-6 * num_context

    def decode_s(self, batch_size, context) -> float:
        return 0.004 + 0.001 * batch_size + 1e-6 * context


def sim_config(num_decode=2, num_prefill=0, max_num_seqs=8, budget=32, **kwargs) -> SimConfig:
    return SimConfig(num_prefill, num_decode, 400, 4096,
                     EngineConfig(block_size=BLOCK, max_num_batched_tokens=budget,
                                  max_num_seqs=max_num_seqs), **kwargs)


def fifo_reference(bursts, s_per_token):
    """Every token one at a time, in arrival order: (rank, seq, step, position) break ties."""
    tokens = sorted((end_s + hop_s, rank, seq, step, i)
                    for seq, (ends_s, hop_s, rank, num_lists) in enumerate(bursts)
                    for step, end_s in enumerate(ends_s) for i in range(num_lists))
    times = [[[] for _ in range(num_lists)] for _, _, _, num_lists in bursts]
    free_s = 0.0
    for arrival_s, _, seq, _, i in tokens:
        free_s = max(arrival_s, free_s) + s_per_token
        times[seq][i].append(free_s)
    return times


def test_tokens_of_two_sources_are_delivered_in_arrival_order():
    frontend = SharedFrontend(1.0)
    a = [[], []]
    b = [[]]
    burst_a = frontend.add([0.0, 10.0], 0.0, 0, a)
    burst_b = frontend.add([1.0, 2.0], 0.0, 1, b)
    frontend.serve_through(burst_b)  # A's second step comes later: not served yet
    assert b == [[3.0, 4.0]] and a == [[], []]
    frontend.serve_through(burst_a)
    assert a == [[1.0, 11.0], [2.0, 12.0]]


def test_a_tie_goes_to_the_source_ranked_first_and_a_cut_drops_the_tail():
    frontend = SharedFrontend(1.0)
    late, early = [[]], [[]]
    ends_s = [5.0, 6.0, 7.0]
    stretch = frontend.add(ends_s, 0.5, 3, late, is_closed=False)
    step = frontend.add([5.5], 0.0, 1, early)
    frontend.serve_through(step)
    assert early == [[6.5]] and late == [[]]
    del ends_s[2:]  # the stretch is cut after its second step, then ends
    frontend.close(stretch)
    frontend.serve_all()
    assert late == [[7.5, 8.5]]


def test_serving_matches_one_token_at_a_time_on_random_bursts():
    rng = random.Random(7)
    bursts = []
    for seq in range(60):
        start_s = rng.uniform(0, 2)
        ends_s = [start_s + 0.01 * k for k in range(rng.randint(1, 30))]
        bursts.append((ends_s, rng.choice((0.0, 0.0005)), rng.randrange(4),
                       rng.randint(1, 6)))
    frontend = SharedFrontend(0.0004)
    lists = [[[] for _ in range(n)] for *_, n in bursts]
    handles = [frontend.add(ends_s, hop_s, rank, lists[seq])
               for seq, (ends_s, hop_s, rank, _) in enumerate(bursts)]
    for handle in handles[::7]:  # served in pieces, as the simulator's checks do
        frontend.serve_through(handle)
    frontend.serve_all()
    expected = fifo_reference(bursts, 0.0004)
    for got, want in zip(lists, expected):
        for got_times, want_times in zip(got, want):
            assert got_times == pytest.approx(want_times, rel=0, abs=1e-9)


def test_with_no_cost_there_is_no_frontend_and_tokens_arrive_as_produced():
    sim = Simulator(sim_config(1), ConstantModel())
    record = sim.run(requests([(10, 4)]), [0.5]).records()[0]
    assert sim.frontend is None
    assert record.ttft_ms == pytest.approx(10.0)
    assert record.itl_ms == pytest.approx((10.0, 10.0, 10.0))
    with pytest.raises(ValueError):
        SharedFrontend(0.0)


def test_an_idle_frontend_adds_its_cost_per_token_of_the_step():
    sim = Simulator(sim_config(1, frontend_s_per_token=0.001), ConstantModel())
    records = sim.run(requests([(6, 3), (6, 3)]), [0.0, 0.0]).records()
    # One step serves both: the first request's token after 1 ms, the second's after 2.
    assert records[0].ttft_ms == pytest.approx(11.0)
    assert records[1].ttft_ms == pytest.approx(12.0)
    assert records[1].itl_ms == pytest.approx((10.0, 10.0))


def test_output_throughput_far_over_the_ceiling_is_one_over_the_cost():
    s_per_token = 0.001  # 1,000 tok/s; two workers of 32 sequences make 6,400 tok/s
    sim = Simulator(sim_config(2, max_num_seqs=32, frontend_s_per_token=s_per_token),
                    ConstantModel())
    reqs = requests([(8, 60)] * 200)
    result = sim.run(reqs, [0.0] * len(reqs))
    summary = result.summary({})
    assert summary["num_errors"] == 0
    assert summary["output_token_throughput"] == pytest.approx(1 / s_per_token, rel=0.02)
    assert result.stats()["frontend"]["busy_fraction"] > 0.98


def test_tpot_under_saturation_is_concurrency_times_the_cost():
    # 32 requests prefill in one step and decode side by side on two workers (10 ms steps): the
    # frontend needs 64 ms to deliver one token to each, so each gets a token every 64 ms.
    s_per_token = 0.002
    sim = Simulator(sim_config(2, max_num_seqs=16, budget=128, frontend_s_per_token=s_per_token),
                    ConstantModel())
    reqs = requests([(8, 100)] * 32)
    records = sim.run(reqs, [0.0] * len(reqs)).records()
    tpots_ms = [(r.e2e_ms - r.ttft_ms) / (r.output_tokens - 1) for r in records]
    assert min(tpots_ms) == pytest.approx(32 * s_per_token * 1e3, rel=0.01)
    assert max(tpots_ms) == pytest.approx(32 * s_per_token * 1e3, rel=0.01)


def test_tokens_of_two_workers_are_delivered_in_production_order():
    # Every request arrives at once, so routing does not depend on when requests finish and the
    # run without a frontend produces the same tokens at the same times.
    reqs = requests([(6 + i % 5, 20 + (i * 7) % 30) for i in range(24)])
    produced = Simulator(sim_config(2, routing=ROUND_ROBIN), BatchModel()).run(reqs, [0.0] * 24)
    s_per_token = 0.0007
    delivered = Simulator(sim_config(2, routing=ROUND_ROBIN, frontend_s_per_token=s_per_token),
                          BatchModel()).run(reqs, [0.0] * 24)
    pairs = sorted((d, p) for a, b in zip(produced.requests, delivered.requests)
                   for p, d in zip(a.token_times_s, b.token_times_s))
    assert len(pairs) == sum(r.output_len for r in reqs)
    workers = {id(r.decode_worker) for r in produced.requests}
    assert len(workers) == 2
    production_order = [p for _, p in pairs]
    assert production_order == sorted(production_order)  # FIFO across both workers
    gaps = [b[0] - a[0] for a, b in zip(pairs, pairs[1:])]
    assert min(gaps) == pytest.approx(s_per_token)  # one token at a time
    assert all(d >= p + s_per_token - 1e-12 for d, p in pairs)


@pytest.mark.parametrize("num_prefill", [0, 1])
def test_collapsed_decode_stretches_deliver_exactly_as_steps_one_at_a_time(num_prefill):
    # Staggered arrivals cut many stretches short; round-robin routing does not depend on the
    # load books, which hear of a stretch's blocks only when it ends.
    reqs = requests([(10 + i % 7, 20 + (i * 13) % 40) for i in range(48)])
    offsets = [0.011 * i for i in range(48)]
    runs = []
    for collapse in (True, False):
        config = sim_config(3, num_prefill,
                            routing=RoutingConfig(remote_prefill_min_tokens=8,
                                                  policy=ROUND_ROBIN.policy),
                            frontend_s_per_token=0.0006, rpc_s=0.0005,
                            collapse_decode_steps=collapse)
        result = Simulator(config, BatchModel()).run(reqs, offsets, max_concurrency=16)
        runs.append([r.token_times_s for r in result.requests])
    assert [len(times) for times in runs[0]] == [r.output_len for r in reqs]
    for collapsed, stepped in zip(*runs):
        assert collapsed == pytest.approx(stepped, rel=0, abs=1e-9)


def test_a_closed_loop_client_sends_its_next_request_when_the_last_token_is_delivered():
    sim = Simulator(sim_config(1, frontend_s_per_token=0.004), ConstantModel())
    records = sim.run(requests([(6, 3), (6, 3)]), [0.0, 0.0], max_concurrency=1).records()
    first_done_s = records[0].start_s + records[0].e2e_ms / 1e3
    assert first_done_s == pytest.approx(0.034)  # tokens produced at 10, 20, 30 ms
    assert records[1].start_s == pytest.approx(first_done_s)


def test_the_cost_comes_from_the_profile_unless_the_flag_sets_it(tmp_path):
    profile = synthetic_profile(num_kv_blocks=512, max_model_len=2048)
    profile["serving"] = {"frontend_us_per_token": 76.6, "measured": "x"}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)

    def config(*flags: str) -> SimConfig:
        args = parser.parse_args(["--profile", str(path), *flags])
        return sim_config_from_args(args, load_profile(str(path))[0], 0, 2)

    assert config().frontend_s_per_token == pytest.approx(76.6e-6)
    assert config("--frontend-us-per-token", "0").frontend_s_per_token == 0.0
    del profile["serving"]
    path.write_text(json.dumps(profile))
    assert config().frontend_s_per_token == 0.0
