"""benchmarks/plan_check_bench.py's pure parts: the probe it sends, how it judges it, and the
measured goodput it brackets."""

from __future__ import annotations

import pytest

from benchmarks.plan_check_bench import (measured_goodput, probe_attainment, probe_flags,
                                         shape_flags)
from tandem.planner.plan import PlanSearch


def test_the_probe_is_sized_as_the_plan_sizes_its_own():
    assert probe_flags(8.25, 60.0, 2000, 3) == ["--request-rate", "8.25", "--num-requests",
                                                "495", "--seed", "3"]
    assert probe_flags(50.0, 60.0, 2000, 0)[3] == "2000"   # the plan's cap
    assert probe_flags(0.5, 60.0, 2000, 0)[3] == "100"     # and its floor
    best = {"num_prefill": 1, "num_decode": 1, "remote_prefill_min_tokens": 256,
            "max_num_batched_tokens": 2048}
    assert shape_flags(best) == ["--num-prefill", "1", "--num-decode", "1",
                                 "--remote-prefill-min-tokens", "256",
                                 "--max-num-batched-tokens", "2048"]


def _summary(ttfts_ms: list[float], e2e_s: float = 0.5) -> dict:
    return {"per_request": [{"request_index": i, "start_s": 0.1 * i, "ttft_ms": ttft,
                             "itl_ms": [20.0], "e2e_ms": e2e_s * 1e3, "prompt_tokens": 8,
                             "cached_tokens": 0, "output_tokens": 2, "error": None}
                            for i, ttft in enumerate(ttfts_ms)]}


def test_a_probe_is_judged_on_all_but_its_first_fifth():
    search = PlanSearch({"ttft_ms": 100.0, "itl_ms": 40.0})
    # The first 2 of 10 (the warm-up) miss, and one judged request of 8.
    attained, bounded = probe_attainment(_summary([500, 500] + [50] * 7 + [150]), search)
    assert attained == pytest.approx(7 / 8) and bounded
    # Latencies that grow with each request: a backlog, whatever the SLO says.
    growing = _summary([50] * 40)
    for i, record in enumerate(growing["per_request"]):
        record["e2e_ms"] = 500.0 + 400.0 * i
    assert probe_attainment(growing, search)[1] is False


def test_the_measured_goodput_is_bracketed_by_the_probed_rates():
    rows = [{"rate_rps": 6.6, "real": 0.97, "real_keeps_up": True},
            {"rate_rps": 8.25, "real": 0.92, "real_keeps_up": True},
            {"rate_rps": 9.9, "real": 0.95, "real_keeps_up": False}]
    assert measured_goodput(rows, 0.9) == (8.25, 9.9)
    assert measured_goodput(rows[:2], 0.95) == (6.6, 8.25)
    assert measured_goodput(rows[:1], 0.99) == (None, 6.6)
