"""benchmarks/step_log_report.py: a step log's steps against the model, and the loop between."""

from __future__ import annotations

import pytest

from benchmarks.step_log_report import kind, report, rows
from tandem.planner.perf_model import PerfModel
from tandem.planner.sim_synthetic import synthetic_profile


def _step(began: float, thread: float, handoff: float, prefill: int = 0, cached: int = 0,
          decodes: int = 0, context: int = 0) -> dict:
    return {"began_s": began, "ended_s": began + thread, "resumed_s": began + thread + handoff,
            "prefill_tokens": prefill, "cached_tokens": cached, "decode_seqs": decodes,
            "context_tokens": context, "sampled": decodes + bool(prefill)}


def test_each_step_is_set_against_the_models_price_and_the_loop_after_it():
    model = PerfModel.from_profile(synthetic_profile())
    decode_s = model.step_s(0, 0, 8, 8000)
    steps = [_step(0.0, 2 * decode_s, 0.001, decodes=8, context=8000),
             _step(2 * decode_s + 0.003, decode_s, 0.0, prefill=512, cached=0, decodes=8,
                   context=8000),
             _step(10.0, model.step_s(512, 1024, 0, 0), 0.0, prefill=512, cached=1024)]
    table = rows(steps, model, None, idle_s=0.05)
    assert [r["kind"] for r in table] == ["decode", "mixed", "prefill"]
    assert [kind(s) for s in steps] == ["decode", "mixed", "prefill"]
    assert table[0]["thread_s"] / table[0]["model_s"] == pytest.approx(2.0)
    assert table[0]["handoff_s"] == pytest.approx(0.001)
    assert table[0]["loop_s"] == pytest.approx(0.002)      # resumed, then the next step began
    assert table[1]["loop_s"] is None and table[1]["idle_s"] > 9.0   # a gap past --idle-ms
    assert table[2]["thread_s"] / table[2]["model_s"] == pytest.approx(1.0)
    text = report(steps, model, None, 0.05)
    assert "| decode | 1 | 2.000 |" in text and "| prefill | 1 | 1.000 |" in text
    assert "idle" in text.splitlines()[-1]
