"""Pool sizing on a linear performance model with Llama-3.1-8B-on-H200-like step times."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from tandem.planner.sizing import (Load, SizingTarget, _handoff_late, _little_batch,
                                   decode_estimate, plan_pools, prefill_estimate, smallest_pool)


class LinearPerfModel:
    """Step times linear in tokens: 4096 new tokens prefill in ~107 ms, as measured in DESIGN.md."""

    block_size = 16
    kv_bytes_per_token = 131072        # 2 MiB per 16-token block

    def prefill_s(self, num_new_tokens: int, num_cached_tokens: int = 0) -> float:
        return 0.005 + num_new_tokens * 25e-6 + num_cached_tokens * 2e-6

    def decode_s(self, batch_size: int, num_context_tokens: int) -> float:
        return 0.006 + batch_size * 5e-5 + num_context_tokens * 3e-8

    def step_s(self, num_prefill_tokens: int, num_prefill_cached_tokens: int,
               num_decode_seqs: int, num_decode_context_tokens: int) -> float:
        return (self.prefill_s(num_prefill_tokens, num_prefill_cached_tokens)
                + self.decode_s(num_decode_seqs, num_decode_context_tokens) - 0.005)

    def transfer_s(self, num_bytes: int) -> float:
        return 0.001 + num_bytes / 100e9


PERF = LinearPerfModel()
TARGET = SizingTarget(ttft_ms=500, itl_ms=40)
BOUNDS = {"prefill": (1, 8), "decode": (1, 8), "both": (1, 8)}


def test_one_prefill_worker_of_one_prompt_length_is_an_md1_queue():
    load = Load(6.0, 4096, 256)
    estimate = prefill_estimate(PERF, load, TARGET, 1)
    # 4096 tokens in two 2048-token chunks, the second over the first as cached prefix.
    service_s = PERF.prefill_s(2048) + PERF.prefill_s(2048, 2048)
    rho = 6.0 * service_s
    wait_s = rho * service_s / (2 * (1 - rho))        # Erlang C is rho for one server
    transfer_s = PERF.transfer_s(4096 * 131072)
    assert estimate.utilization == pytest.approx(rho)
    assert estimate.ttft_ms == pytest.approx(1e3 * (wait_s + service_s + transfer_s))
    # Mean TTFT 258 ms is well inside 500 ms, but waits are exponential past the atom at zero:
    # rho * exp(-(0.5 - service - transfer) * rho / wait) = 9.9% of requests come in late.
    late = rho * math.exp(-(0.5 - service_s - transfer_s) * rho / wait_s)
    assert late == pytest.approx(0.099, abs=0.001)
    assert not estimate.meets_slo
    assert prefill_estimate(PERF, load, replace(TARGET, attainment=0.9), 1).meets_slo
    assert prefill_estimate(PERF, load, TARGET, 2).meets_slo


def test_a_spread_of_prompt_lengths_needs_more_prefill_than_its_mean():
    """Same mean prompt (4096), same rate: a 9:1 mix of 1024 and 31744 tokens queues behind the
    long ones, and the long ones' chunks run over ever longer prefixes."""
    target = SizingTarget(ttft_ms=2000, itl_ms=80)    # every prompt fits in both alone
    even = Load(10.0, 4096, 256)
    spread = Load(10.0, 4096, 256, input_mix=((1024, 0.9), (31744, 0.1)),
                  mix_is_classes=False)
    plans = [plan_pools(PERF, load, target, "disagg", BOUNDS, 16) for load in (even, spread)]
    assert [p.num_prefill for p in plans] == [2, 3] and all(p.meets_slo for p in plans)
    # 0.9 * 30.6 ms + 0.1 * 1365 ms = 164 ms of prefill per request, against 116.5 ms
    assert prefill_estimate(PERF, spread, target, 3).utilization == pytest.approx(10 * 0.16406 / 3,
                                                                                 rel=1e-3)


def test_prompts_too_long_for_the_ttft_bound_do_not_take_more_workers():
    # 10% of prompts take 1.37 s to prefill alone, over a 500 ms bound: no pool size helps them.
    target = SizingTarget(ttft_ms=500, itl_ms=80)
    load = Load(2.0, 4096, 256, input_mix=((1024, 0.9), (31744, 0.1)),
                  mix_is_classes=False)
    estimate = prefill_estimate(PERF, load, target, 2)
    assert estimate.unreachable_share == pytest.approx(0.1)
    plan = plan_pools(PERF, load, target, "disagg", BOUNDS, 8)
    # Sized for the other 90%: 3 workers keep their waits short, and the budget stays unused.
    assert (plan.num_prefill, plan.num_decode) == (3, 1)
    assert not plan.meets_slo and "10.0% of prompts take longer than the TTFT" in plan.note
    assert plan_pools(PERF, load, replace(target, attainment=0.85), "disagg", BOUNDS, 8).meets_slo


def test_a_kv_pull_longer_than_the_itl_bound_is_reported_not_sized_for():
    """The first gap on the decode worker is the pull, two waits for a step boundary and the
    request's own step: 42.6 ms to pull a 31744-token prompt already exceeds a 40 ms bound."""
    load = Load(2.0, 4096, 256, input_mix=((1024, 0.9), (31744, 0.1)),
                  mix_is_classes=False)
    target = SizingTarget(ttft_ms=2000, itl_ms=40)
    estimate = decode_estimate(PERF, load, target, 1)
    assert estimate.unreachable_share == pytest.approx(0.1) and estimate.meets_slo
    plan = plan_pools(PERF, load, target, "disagg", BOUNDS, 8)
    assert plan.num_decode == 1 and "take longer than the ITL bound to hand over" in plan.note


def test_the_handoff_gap_sizes_the_decode_pool():
    """4k-token prompts (6.4 ms pull) at 30 req/s: one decode worker's 9.1 ms steps meet a 25 ms
    bound, but not the wait for the parking boundary, the step the pull spans and the request's
    own step (18.3 to 27.4 ms); two workers' 7.2 ms steps do (at most 21.7 ms)."""
    load = Load(30.0, 4096, 64)
    target = SizingTarget(ttft_ms=5000, itl_ms=25)
    one, two = (decode_estimate(PERF, load, target, n) for n in (1, 2))
    assert 1e3 * PERF.transfer_s(4096 * 131072) < two.itl_ms  # the pull ends within a step
    assert 2 * one.itl_ms < 25 < 3 * one.itl_ms and 3 * two.itl_ms < 25
    assert one.itl_ms < 25 and not one.meets_slo and two.meets_slo


def test_a_pull_longer_than_a_step_ends_inside_a_step_and_waits_out_the_rest():
    """The pulled request joins at the first step boundary after its pull ends, at a uniform
    point of a step: alone on its worker, a 16k-token prompt's 22.5 ms pull beside 6.5 ms steps
    gives a first gap of (U + V + 22.5 / 6.5 + 1) steps, late against a 36 ms bound when
    U + V > 1.08, in (2 - 1.08)^2 / 2 = 43% of cases; a 4k-token prompt's 6.4 ms pull beside 6.2 ms
    steps gives at most 6.4 + 3 x 6.2 = 25 ms."""
    target = SizingTarget(ttft_ms=60000, itl_ms=36)
    short, long = Load(1.0, 4096, 64), Load(1.0, 16384, 64)
    late_short = _handoff_late(PERF, short, target, 1, 1)[0]
    late_long = _handoff_late(PERF, long, target, 1, 1)[0]
    assert late_short == 0.0 and late_long == pytest.approx(0.435, abs=0.01)


def test_the_late_share_falls_smoothly_as_steps_shorten():
    """No saw-tooth from whole steps: a shorter step (a smaller batch, one more worker) never
    leaves more first gaps late, so the decode pool's size does not jump over a load change."""
    from tandem.planner.sizing import _late_handoff_share
    shares = [_late_handoff_share(0.0225, step_ms / 1e3, 0.036) for step_ms in range(12, 2, -1)]
    assert shares == sorted(shares, reverse=True) and shares[0] > shares[-1]


def test_clumped_arrivals_hand_over_into_a_fuller_batch():
    """A request lands with its clump-mates, (dispersion - 1) / n of them on its decode worker:
    clumps of ten at the same mean rate leave more first gaps late than Poisson arrivals."""
    target = SizingTarget(ttft_ms=5000, itl_ms=21)
    poisson = Load(30.0, 4096, 64)
    clumped = Load(30.0, 4096, 64, arrival_dispersion=10.0)
    batch = _little_batch(PERF, poisson, target, 2)
    late_poisson = _handoff_late(PERF, poisson, target, batch, 2)[0]
    late_clumped = _handoff_late(PERF, clumped, target, batch, 2)[0]
    assert late_clumped > late_poisson
    # Spread over more workers, each holds fewer of the clump.
    assert _handoff_late(PERF, clumped, target, batch, 8)[0] < late_clumped


def test_prefix_hits_make_prefill_cheaper():
    cold = prefill_estimate(PERF, Load(8.0, 4096, 256, 0.0), TARGET, 1)
    warm = prefill_estimate(PERF, Load(8.0, 4096, 256, 0.75), TARGET, 1)
    assert warm.utilization < cold.utilization / 2


def test_decode_itl_follows_littles_law():
    load = Load(6.0, 4096, 256)
    estimate = decode_estimate(PERF, load, TARGET, 1)
    batch = math.ceil(6.0 * 256 * estimate.itl_ms / 1e3)  # running = rate * OSL * ITL
    assert estimate.itl_ms == pytest.approx(1e3 * PERF.decode_s(batch, batch * 4224), rel=0.02)
    assert estimate.meets_slo


def test_pools_grow_with_load_and_zero_load_gives_minimum():
    sizes = [plan_pools(PERF, Load(rate, 4096, 256), TARGET, "disagg", BOUNDS, 8)
             for rate in (0.0, 6.0, 12.0, 20.0)]
    # Poisson arrivals: a handoff's steps are those of the mean batch (no clump lands with it).
    assert [(p.num_prefill, p.num_decode) for p in sizes] == [(1, 1), (2, 1), (3, 1), (3, 2)]
    assert all(p.meets_slo and p.num_both == 0 for p in sizes)


def test_gpu_budget_and_max_bounds_are_respected():
    heavy = Load(40.0, 4096, 256)
    plan = plan_pools(PERF, heavy, TARGET, "disagg", BOUNDS, 8)
    assert plan.num_prefill + plan.num_decode == 8 and not plan.meets_slo
    assert "budget" in plan.note
    capped = plan_pools(PERF, heavy, TARGET, "disagg",
                        {**BOUNDS, "prefill": (1, 2)}, 16)
    assert capped.num_prefill == 2 and not capped.meets_slo


def test_minimums_hold_at_zero_load():
    plan = plan_pools(PERF, Load(0.0, 4096, 256), TARGET, "disagg",
                      {**BOUNDS, "prefill": (2, 8), "decode": (3, 8)}, 8)
    assert (plan.num_prefill, plan.num_decode) == (2, 3)


def test_unreachable_ttft_does_not_take_every_gpu():
    strict = SizingTarget(ttft_ms=50, itl_ms=40)     # one 4096-token prefill alone takes 107 ms
    plan = plan_pools(PERF, Load(1.0, 4096, 256), strict, "disagg", BOUNDS, 8)
    assert not plan.meets_slo
    assert plan.num_prefill == 1


def test_auto_layout_picks_fewer_gpus_and_ties_keep_the_current_layout():
    short_prompts = Load(20.0, 256, 1024)
    assert plan_pools(PERF, short_prompts, TARGET, "auto", BOUNDS, 8).layout == "agg"
    tie = Load(2.0, 4096, 256)       # 1 prefill + 1 decode, or 2 aggregated
    assert plan_pools(PERF, tie, TARGET, "auto", BOUNDS, 8, "disagg").layout == "disagg"
    assert plan_pools(PERF, tie, TARGET, "auto", BOUNDS, 8, "agg").layout == "agg"


def test_long_chunks_break_the_aggregated_itl():
    load = Load(9.0, 4096, 256)
    short = plan_pools(PERF, load, SizingTarget(500, 40, chunk_tokens=512), "agg", BOUNDS, 8)
    long = plan_pools(PERF, load, SizingTarget(500, 40, chunk_tokens=2048), "agg", BOUNDS, 8)
    assert short.meets_slo and not long.meets_slo
    assert math.isfinite(short.num_both)


def test_bursts_that_would_spill_onto_decode_workers_need_more_prefill():
    """Short prompts at 20 req/s keep one prefill worker 61% busy and meet a 5 s TTFT, arriving one
    by one. In batches (variance 20x the mean per second) the wait grows tenfold and about 10
    prompts are in flight on average: with z = 2.33 that overflows one worker's 8 places, and a
    spilled prompt is prefilled on a decode worker, inside everyone's decode steps."""
    target = SizingTarget(ttft_ms=5000, itl_ms=40)
    smooth = Load(20.0, 1024, 256)
    bursty = replace(smooth, arrival_dispersion=20.0)
    assert prefill_estimate(PERF, smooth, target, 1).meets_slo
    burst_one = prefill_estimate(PERF, bursty, target, 1)
    assert burst_one.ttft_ms > 9 * prefill_estimate(PERF, smooth, target, 1).ttft_ms
    assert not burst_one.meets_slo
    assert plan_pools(PERF, bursty, target, "disagg", BOUNDS, 8).num_prefill == 2
    roomy = replace(target, max_prefill_queue=48)     # 10.3 + 2.33 * sqrt(20 * 10.3) = 43.7
    assert prefill_estimate(PERF, bursty, roomy, 1).meets_slo


def test_prompts_below_the_remote_prefill_threshold_need_no_prefill_pool():
    """The router prefills a prompt on its decode worker when fewer than
    remote_prefill_min_tokens of it are uncached, so short prompts never reach a prefill pool:
    with a minimum of 0 it empties, and its GPU goes to decode."""
    bounds = {**BOUNDS, "prefill": (0, 8)}
    short = Load(10.0, 128, 1024)
    plan = plan_pools(PERF, short, TARGET, "disagg", bounds, 8)
    assert plan.num_prefill == 0 and plan.num_decode >= 1 and plan.meets_slo
    mixed = Load(10.0, 2048, 256, input_mix=((128.0, 0.5), (3968.0, 0.5)),
                 mix_is_classes=False)
    assert plan_pools(PERF, mixed, TARGET, "disagg", bounds, 8).num_prefill == \
        plan_pools(PERF, Load(5.0, 3968, 256), TARGET, "disagg", bounds, 8).num_prefill
    cached = Load(10.0, 4096, 256, prefix_hit_rate=0.95)     # 205 new tokens of each prompt
    assert plan_pools(PERF, cached, TARGET, "disagg", bounds, 8).num_prefill == 0


def test_prompts_that_miss_the_ttft_bound_alone_do_not_size_the_decode_pool():
    """A prompt whose prefill alone passes the TTFT bound misses the SLO whatever its first gap:
    its pull is left out of the decode pool's late share (the prefill pool counts it)."""
    itl_bound = SizingTarget(ttft_ms=60000, itl_ms=36)
    long = Load(1.0, 16384, 64)
    assert _handoff_late(PERF, long, itl_bound, 1, 1)[0] > 0.4
    floor_s = prefill_estimate(PERF, long, itl_bound, 1).ttft_ms / 1e3
    tight_ttft = SizingTarget(ttft_ms=1e3 * floor_s / 2, itl_ms=36)
    assert _handoff_late(PERF, long, tight_ttft, 1, 1) == (0.0, 0.0)


def test_the_pools_share_one_miss_budget():
    """20 req/s; 1% of the prompts have 16k tokens (a 22.5 ms pull beside a 36 ms ITL bound) and
    0.4% have 32k tokens (1.4 s of prefill against a 1 s TTFT bound). On its own, each pool is
    within 1%: 2 prefill workers leave 0.18% of the requests waiting past the TTFT bound, 1 decode
    worker 0.62% with a late first gap; with the 0.4% no pool helps, 1.19% would miss. The plan is
    the cheapest pair whose misses add up to 1% at most, as an exhaustive search finds it."""
    target = SizingTarget(ttft_ms=1000, itl_ms=36)
    mix = ((2048.0, 0.986), (16384.0, 0.01), (32768.0, 0.004))
    load = Load(20.0, sum(t * s for t, s in mix), 64, input_mix=mix, mix_is_classes=False)
    alone = (smallest_pool(prefill_estimate, PERF, load, target, BOUNDS["prefill"]),
             smallest_pool(decode_estimate, PERF, load, target, BOUNDS["decode"]))
    assert [pool.num_workers for pool in alone] == [2, 1]
    assert [pool.late_share for pool in alone] == pytest.approx([0.00175, 0.00615], abs=5e-5)
    assert alone[0].unreachable_share == pytest.approx(0.004)
    plan = plan_pools(PERF, load, target, "disagg", BOUNDS, 16)
    assert (plan.num_prefill, plan.num_decode) == (3, 2) and plan.meets_slo

    fits = []
    for p in range(1, 9):
        for d in range(1, 9):
            prefill = prefill_estimate(PERF, load, target, p)
            decode = decode_estimate(PERF, load, target, d)
            misses = (prefill.unreachable_share + decode.unreachable_share
                      + prefill.late_share + decode.late_share)
            if prefill.keeps_up and decode.keeps_up and misses <= 0.01:
                fits.append((p + d, misses, (p, d)))
    assert min(fits)[2] == (3, 2)


def test_a_class_is_a_range_and_its_top_can_pass_the_ttft_bound():
    """Class 15 (16,384 to 32,767 tokens) with its mean in the middle: eight points 2,048 tokens
    apart from 17,408. The prefill of the class mean (24,576) fits a 1.1 s bound, but the top three
    points' prefills alone do not: 3/8 of the class is unreachable."""
    def floor_s(tokens: float) -> float:   # chunk by chunk, each over the prefix before it
        done, total = 0, PERF.transfer_s(math.ceil(tokens / 16) * 16 * 131072)
        while done < round(tokens):
            chunk = min(2048, round(tokens) - done)
            total += PERF.prefill_s(chunk, done)
            done += chunk
        return total

    points = [17408 + 2048 * j for j in range(8)]
    bound_s = 1.1
    assert floor_s(24576) < bound_s
    assert [floor_s(t) >= bound_s for t in points] == [False] * 5 + [True] * 3
    target = SizingTarget(ttft_ms=1e3 * bound_s, itl_ms=80)
    classes = Load(1.0, 10000, 64, input_mix=((2048.0, 0.8), (24576.0, 0.2)))
    assert prefill_estimate(PERF, classes, target, 2).unreachable_share == pytest.approx(0.2 * 3 / 8)
    exact = replace(classes, mix_is_classes=False)
    assert prefill_estimate(PERF, exact, target, 2).unreachable_share == 0.0
