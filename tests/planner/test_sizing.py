"""Pool sizing on a linear performance model with Llama-3.1-8B-on-H200-like step times."""

from __future__ import annotations

import math

import pytest

from tandem.planner.sizing import (Load, SizingTarget, decode_estimate, plan_pools,
                                   prefill_estimate)


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


def test_prefill_estimate_is_md1_queue_plus_service_plus_transfer():
    load = Load(6.0, 4096, 256)
    estimate = prefill_estimate(PERF, load, TARGET, 1)
    service_s = PERF.prefill_s(4096)
    rho = 6.0 * service_s
    transfer_s = PERF.transfer_s(4096 * 131072)
    expected_ms = 1e3 * (rho * service_s / (2 * (1 - rho)) + service_s + transfer_s)
    assert estimate.utilization == pytest.approx(rho)
    assert estimate.ttft_ms == pytest.approx(expected_ms)
    assert estimate.meets_slo


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
    assert [(p.num_prefill, p.num_decode) for p in sizes] == [(1, 1), (1, 1), (2, 1), (3, 2)]
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
    tie = Load(6.0, 4096, 256)       # 1 prefill + 1 decode, or 2 aggregated
    assert plan_pools(PERF, tie, TARGET, "auto", BOUNDS, 8, "disagg").layout == "disagg"
    assert plan_pools(PERF, tie, TARGET, "auto", BOUNDS, 8, "agg").layout == "agg"


def test_long_chunks_break_the_aggregated_itl():
    load = Load(9.0, 4096, 256)
    short = plan_pools(PERF, load, SizingTarget(500, 40, chunk_tokens=512), "agg", BOUNDS, 8)
    long = plan_pools(PERF, load, SizingTarget(500, 40, chunk_tokens=2048), "agg", BOUNDS, 8)
    assert short.meets_slo and not long.meets_slo
    assert math.isfinite(short.num_both)
