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

    def step_s(self, num_prefill, cached, num_decode, num_context, step_budget=None) -> float:
        return 0.004 + 0.0003 * num_prefill + 0.001 * num_decode + 1e-6 * num_context

    def decode_s(self, batch_size, context) -> float:
        return 0.004 + 0.001 * batch_size + 1e-6 * context


def sim_config(num_decode=2, num_prefill=0, max_num_seqs=8, budget=32, **kwargs) -> SimConfig:
    return SimConfig(num_prefill, num_decode, 400, 4096,
                     EngineConfig(block_size=BLOCK, max_num_batched_tokens=budget,
                                  max_num_seqs=max_num_seqs), **kwargs)


# A burst here is (step end times, hop, rank, names of its streams); a stream may span bursts.

def arrivals(bursts):
    """Every token as (arrival, rank, seq, step, position, stream): the order they are let in."""
    return sorted((end_s + hop_s, rank, seq, step, i, name)
                  for seq, (ends_s, hop_s, rank, names) in enumerate(bursts)
                  for step, end_s in enumerate(ends_s) for i, name in enumerate(names))


def fifo_reference(bursts, s_per_token):
    """Every token one at a time, in arrival order: {stream: delivery times}."""
    times = {name: [] for *_, names in bursts for name in names}
    free_s = 0.0
    for arrival_s, *_, name in arrivals(bursts):
        free_s = max(arrival_s, free_s) + s_per_token
        times[name].append(free_s)
    return times


def round_robin_reference(bursts, s_per_token):
    """Every token one at a time: each turn goes to the stream that (re)joined the rotation first.

    A stream joins when a token reaches it while it has none waiting (keyed by that token's place
    in the arrival order), or rejoins when its turn ends with tokens left (keyed by that instant,
    after every token that arrived by then)."""
    waiting = {name: [] for *_, names in bursts for name in names}  # its tokens not yet served
    for key in arrivals(bursts):
        waiting[key[-1]].append(key)
    times = {name: [] for name in waiting}
    turn_ended_s = {}
    t = 0.0
    while any(waiting.values()):
        ready = {}
        for name, keys in waiting.items():
            if keys and keys[0][0] <= t:
                done_s = turn_ended_s.get(name)
                ready[name] = ((done_s, 1) if done_s is not None and keys[0][0] <= done_s
                               else (keys[0][0], 0, keys[0]))
        if not ready:
            t = min(keys[0][0] for keys in waiting.values() if keys)
            continue
        name = min(ready, key=ready.get)
        waiting[name].pop(0)
        t += s_per_token
        times[name].append(t)
        turn_ended_s[name] = t
    return times


def random_bursts(seed: int, num_workers: int = 4):
    """Workers stepping at their own pace over batches that change now and then; runs of steps
    with the same batch are handed over as stretches cut at random, the rest step by step."""
    rng = random.Random(seed)
    bursts = []
    for rank in range(num_workers):
        hop_s = rng.choice((0.0, 0.0005))
        end_s, batch, steps = rng.uniform(0, 0.05), [], []
        for step in range(rng.randint(60, 160)):
            if batch and rng.random() < 0.08:
                batch.pop(rng.randrange(len(batch)))
            if len(batch) < 6 and rng.random() < 0.15:
                batch.append(f"{rank}.{step}")
            end_s += rng.uniform(0.004, 0.012)
            if batch:
                steps.append((end_s, tuple(batch)))
        while steps:
            num_steps = 1
            while (num_steps < len(steps) and steps[num_steps][1] == steps[0][1]
                   and rng.random() < 0.9):
                num_steps += 1
            bursts.append(([end for end, _ in steps[:num_steps]], hop_s, rank, steps[0][1]))
            del steps[:num_steps]
    return bursts


def serve_as_they_come(bursts, s_per_token, on_serve=None):
    """Hand each burst over just before its first token arrives, serving up to then each time."""
    frontend = SharedFrontend(s_per_token)
    lists = {name: [] for *_, names in bursts for name in names}
    for ends_s, hop_s, rank, names in sorted(bursts, key=lambda b: b[0][0] + b[1]):
        now_s = ends_s[0] + hop_s - 1e-7  # every token that reaches it by now is in
        frontend.serve_through(now_s)
        if on_serve is not None:
            on_serve(frontend, lists, now_s)
        frontend.add(list(ends_s), hop_s, rank, [lists[name] for name in names])
    return frontend, lists


def assert_same_times(got, want):
    assert got.keys() == want.keys()
    for name, times_s in want.items():
        assert got[name] == pytest.approx(times_s, rel=0, abs=1e-9), name


def test_a_stream_takes_its_turn_after_the_streams_that_joined_before_it():
    # A's three tokens are all there before B's and C's, yet B and C each get a turn between them.
    frontend = SharedFrontend(1.0)
    a, b, c = [[]], [[]], [[]]
    frontend.add([0.0, 0.1, 0.2], 0.0, 0, a)
    frontend.add([0.5], 0.0, 1, b)
    frontend.serve_through(0.5)
    assert a == [[1.0]] and b == [[]]  # B's turn starts at 1
    assert not frontend.is_delivered(b[0])
    assert frontend.earliest_last_turn_s(b[0]) == 1.0
    frontend.add([1.5], 0.0, 2, c)
    frontend.serve_through(2.0)
    assert a == [[1.0, 3.0]] and b == [[2.0]] and c == [[]]
    assert frontend.is_delivered(b[0])
    frontend.serve_all()
    assert a == [[1.0, 3.0, 5.0]] and c == [[4.0]]
    bursts = [([0.0, 0.1, 0.2], 0.0, 0, "a"), ([0.5], 0.0, 1, "b"), ([1.5], 0.0, 2, "c")]
    assert round_robin_reference(bursts, 1.0) == {"a": [1.0, 3.0, 5.0], "b": [2.0], "c": [4.0]}
    assert fifo_reference(bursts, 1.0) == {"a": [1.0, 2.0, 3.0], "b": [4.0], "c": [5.0]}


def test_a_token_that_arrives_as_its_streams_turn_ends_waits_for_the_newcomers():
    frontend = SharedFrontend(1.0)
    x, y, z = [], [], []
    frontend.add([0.0], 0.0, 0, [x, y])
    frontend.add([2.0], 0.0, 0, [y, z])  # y's turn ends at 2: z joined by then, y rejoins after
    frontend.serve_all()
    assert (x, y, z) == ([1.0], [2.0, 4.0], [3.0])
    assert round_robin_reference([([0.0], 0.0, 0, "xy"), ([2.0], 0.0, 0, "yz")], 1.0) == {
        "x": [1.0], "y": [2.0, 4.0], "z": [3.0]}


def test_a_tie_goes_to_the_source_ranked_first_and_a_cut_drops_the_tail():
    frontend = SharedFrontend(1.0)
    late, early = [[]], [[]]
    ends_s = [5.0, 6.0, 7.0]
    frontend.add(ends_s, 0.5, 3, late)
    frontend.add([5.5], 0.0, 1, early)
    frontend.serve_through(5.5)
    assert early == [[6.5]] and late == [[]]
    del ends_s[2:]  # the stretch is cut after its second step
    frontend.serve_all()
    assert late == [[7.5, 8.5]]
    assert frontend.num_tokens == 3


@pytest.mark.parametrize("seed", [7, 8, 9])
@pytest.mark.parametrize("s_per_token", [0.0004, 0.0012])  # under and over the ceiling
def test_serving_matches_one_token_at_a_time_on_random_bursts(seed, s_per_token):
    bursts = random_bursts(seed)
    frontend, lists = serve_as_they_come(bursts, s_per_token)
    frontend.serve_all()
    assert_same_times(lists, round_robin_reference(bursts, s_per_token))
    assert frontend.num_tokens == sum(map(len, lists.values()))
    # The server never idles while a token waits: the instants are those of a FIFO server.
    fifo = sorted(t for times_s in fifo_reference(bursts, s_per_token).values() for t in times_s)
    turns = sorted(t for times_s in lists.values() for t in times_s)
    assert turns == pytest.approx(fifo, rel=0, abs=1e-9)
    assert lists != fifo_reference(bursts, s_per_token)  # but to other streams


def test_the_bound_on_a_last_turn_is_never_late_and_exact_once_nothing_else_comes():
    bursts = random_bursts(11)
    s_per_token = 0.0015  # more work than time: a backlog to the end
    expected = round_robin_reference(bursts, s_per_token)
    arrived_s = {name: [] for name in expected}
    for arrival_s, *_, name in arrivals(bursts):
        arrived_s[name].append(arrival_s)
    gaps_s = []

    def check(frontend, lists, now_s):
        for name, times_s in lists.items():
            if not frontend.is_delivered(times_s):
                num_in = sum(arrival_s <= now_s for arrival_s in arrived_s[name])
                turn_s = expected[name][num_in - 1] - s_per_token  # of its last token in
                bound_s = frontend.earliest_last_turn_s(times_s)
                assert now_s < bound_s <= turn_s + 1e-9
                gaps_s.append(turn_s - bound_s)

    frontend, lists = serve_as_they_come(bursts, s_per_token, check)
    assert len(gaps_s) > 100 and max(gaps_s) > 0.01
    last_s = max(ends_s[-1] + hop_s for ends_s, hop_s, *_ in bursts)
    frontend.serve_through(last_s)  # every token is in: the bound is each last turn exactly
    gaps_s.clear()
    check(frontend, lists, last_s)
    assert len(gaps_s) > 5 and max(map(abs, gaps_s)) < 1e-9
    frontend.serve_all()
    assert_same_times(lists, expected)


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


def test_a_request_reaching_a_saturated_frontend_waits_about_one_rotation_not_the_backlog():
    # 32 requests on two workers make 1,920 tokens by 0.6 s; the frontend serves 500 tok/s. At
    # 1 s it is ~1,400 tokens behind, 2.8 s of work that a FIFO frontend would put before a new
    # request's first token; taking the streams in turn, that token waits for one round of turns.
    s_per_token = 0.002
    sim = Simulator(sim_config(2, max_num_seqs=17, budget=128, routing=ROUND_ROBIN,
                               frontend_s_per_token=s_per_token), ConstantModel())
    reqs = requests([(8, 60)] * 32 + [(8, 20)] * 2)
    records = sim.run(reqs, [0.0] * 32 + [1.0] * 2).records()
    rotation_ms = 32 * s_per_token * 1e3
    for late in records[32:]:
        assert late.ttft_ms < 10.0 + 10.0 + rotation_ms + 2 * s_per_token * 1e3  # step, prefill
        tpot_ms = (late.e2e_ms - late.ttft_ms) / (late.output_tokens - 1)
        assert tpot_ms == pytest.approx(34 * s_per_token * 1e3, rel=0.02)
    # The backlog is there: the others end long after their last token was made (at 0.61 s).
    assert min(r.e2e_ms for r in records[:32]) > 3_500


def test_each_request_gets_its_tokens_in_order_one_turn_at_a_time():
    reqs = requests([(6 + i % 5, 20 + (i * 7) % 30) for i in range(24)])
    s_per_token = 0.002
    runs = [Simulator(sim_config(2, frontend_s_per_token=s_per_token), BatchModel()).run(
            reqs, [0.005 * i for i in range(24)], max_concurrency=12) for _ in range(2)]
    times = [[r.token_times_s for r in result.requests] for result in runs]
    assert times[0] == times[1]  # deterministic, to the bit
    assert [len(t) for t in times[0]] == [r.output_len for r in reqs]
    for request_times_s in times[0]:
        gaps_s = [b - a for a, b in zip(request_times_s, request_times_s[1:])]
        assert min(gaps_s) >= s_per_token - 1e-12
    everything = sorted(t for request_times_s in times[0] for t in request_times_s)
    assert min(b - a for a, b in zip(everything, everything[1:])) >= s_per_token - 1e-12


def test_a_frontend_that_keeps_up_delivers_in_production_order():
    # Every request arrives at once, so routing does not depend on when requests finish and the
    # run without a frontend produces the same tokens at the same times. With no stream holding
    # more than the token in hand, taking the streams in turn is first come, first served.
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
    assert production_order == sorted(production_order)  # across both workers
    gaps = [b[0] - a[0] for a, b in zip(pairs, pairs[1:])]
    assert min(gaps) == pytest.approx(s_per_token)  # one token at a time
    assert all(d >= p + s_per_token - 1e-12 for d, p in pairs)


@pytest.mark.parametrize("num_prefill", [0, 1])
@pytest.mark.parametrize("s_per_token", [0.0006, 0.0015])  # near and well past the ceiling
def test_collapsed_decode_stretches_deliver_exactly_as_steps_one_at_a_time(num_prefill,
                                                                           s_per_token):
    # Staggered arrivals cut many stretches short; round-robin routing does not depend on the
    # load books, which hear of a stretch's blocks only when it ends.
    reqs = requests([(10 + i % 7, 20 + (i * 13) % 40) for i in range(48)])
    offsets = [0.011 * i for i in range(48)]
    runs = []
    for collapse in (True, False):
        config = sim_config(3, num_prefill,
                            routing=RoutingConfig(remote_prefill_min_tokens=8,
                                                  policy=ROUND_ROBIN.policy),
                            frontend_s_per_token=s_per_token, rpc_s=0.0005,
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
        return sim_config_from_args(args, load_profile(args)[0], 0, 2)

    assert config().frontend_s_per_token == pytest.approx(76.6e-6)
    assert config("--frontend-us-per-token", "0").frontend_s_per_token == 0.0
    del profile["serving"]
    path.write_text(json.dumps(profile))
    assert config().frontend_s_per_token == 0.0
