"""benchmarks/step_log_report.py: a step log's steps against the model, and the loop between."""

from __future__ import annotations

import pytest

from benchmarks.step_log_report import (fit_mixed_terms, kind, mixed_terms_text,
                                         recent_prompt_duty, report, rows, shape)
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
    assert all(" | - | - | " in line for line in text.splitlines()[2:-1])   # no host_s logged


def test_the_report_gives_the_host_time_where_the_log_records_it():
    model = PerfModel.from_profile(synthetic_profile())
    steps = [{**_step(0.01 * i, 0.01, 0.0, decodes=8, context=8000), "host_s": 0.001 * (i + 1)}
             for i in range(10)]
    assert " | 5.50 | 10.00 | " in report(steps, model, None, 0.05)   # median, p90 in ms


def test_by_shape_splits_decode_by_batch_and_mixed_by_decode_context():
    model = PerfModel.from_profile(synthetic_profile())
    steps = [_step(0.0, 0.01, 0.0, decodes=8, context=8000),
             _step(0.02, 0.01, 0.0, decodes=40, context=160_000),
             _step(0.04, 0.05, 0.0, prefill=512, decodes=30, context=120_000),
             _step(0.10, 0.05, 0.0, prefill=512, decodes=8, context=20_000),
             {**_step(0.16, 0.05, 0.0, prefill=512, decodes=8, context=20_000),
              "prefill_seqs": 3}]
    assert [shape(s) for s in steps] == ["decode, 1-16 seqs", "decode, 33+ seqs",
                                         "mixed, 50k-150k decode context",
                                         "mixed, <50k decode context",
                                         "mixed, <50k decode context, several prompts"]
    names = [line.split(" | ")[0].lstrip("| ")
             for line in report(steps, model, None, 0.05, by_shape=True).splitlines()[2:-1]]
    assert names == ["decode, 1-16 seqs", "decode, 33+ seqs", "mixed, <50k decode context",
                     "mixed, <50k decode context, several prompts",
                     "mixed, 50k-150k decode context"]


def test_cases_cut_a_log_into_one_report_each(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(synthetic_profile()))
    steps = [{**_step(i * 0.01, 0.005, 0.0001, decodes=4, context=4000), "at_s": 100.0 + i}
             for i in range(6)]
    log = tmp_path / "decode-0.jsonl"
    log.write_text("".join(json.dumps(s) + "\n" for s in steps))
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"case": "light", "start_s": 100.0, "end_s": 101.5},
                                 {"case": "heavy", "start_s": 102.0, "end_s": 110.0}]))
    out = subprocess.run([sys.executable, str(Path(__file__).parents[2] /
                                              "benchmarks/step_log_report.py"),
                          "--profile", str(profile), str(log), "--cases", str(cases)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert f"light: {log}: 2 steps" in out and f"heavy: {log}: 4 steps" in out


def test_mixed_terms_find_what_a_mixed_steps_excess_grows_with():
    # Mixed steps of 2048 prompt tokens whose time over the model's price grows 1% a decoding
    # sequence (whatever their context), a second of decode steps between two halves.
    model = PerfModel.from_profile(synthetic_profile())
    steps, now = [], 0.0
    for i in range(40):
        if i == 20:
            steps.append(_step(now, 1.0, 0.0, decodes=8, context=8000))
            now += 1.0
        decodes, context = 4 + i % 20, (4 + i % 20) * (1000 + 700 * (i % 3))
        seconds = model.step_s(2048, 0, decodes, context) * (1 + 0.01 * decodes)
        steps.append(_step(now, seconds, 0.0, prefill=2048, decodes=decodes, context=context))
        now += seconds
    after_rest = next(i for i, s in enumerate(steps) if not s["prefill_tokens"]) + 1
    assert recent_prompt_duty(steps, after_rest, 2.0) < 0.55
    assert recent_prompt_duty(steps, len(steps) - 1, 0.5) == pytest.approx(1.0)
    fit = fit_mixed_terms(steps, model, None)
    assert fit.num_steps == 40
    assert fit.intercept == pytest.approx(1.0, abs=1e-6)
    assert fit.per_ten_seqs == pytest.approx(0.1, abs=1e-6)
    assert fit.per_duty == pytest.approx(0.0, abs=1e-6)
    assert fit.per_100k_context == pytest.approx(0.0, abs=1e-6)
    assert fit.residual_sd == pytest.approx(0.0, abs=1e-9)
    assert fit.per_extra_prompt is None     # the log does not record prefill_seqs
    assert mixed_terms_text(fit).startswith("mixed steps: 40; thread / model = 1.000 ")
    assert fit_mixed_terms(steps[:5], model, None) is None


def test_mixed_terms_price_the_prompts_of_a_step_where_the_log_records_them():
    # 2% more a prompt past the first, whatever the decode batch.
    model = PerfModel.from_profile(synthetic_profile())
    steps, now = [], 0.0
    for i in range(30):
        decodes, prompts = 4 + i % 7, 1 + i % 5
        seconds = model.step_s(2048, 0, decodes, decodes * 3000) * (1 + 0.02 * (prompts - 1))
        steps.append({**_step(now, seconds, 0.0, prefill=2048, decodes=decodes,
                              context=decodes * 3000), "prefill_seqs": prompts})
        now += seconds
    fit = fit_mixed_terms(steps, model, None)
    assert fit.per_extra_prompt == pytest.approx(0.02, abs=1e-6)
    assert fit.per_ten_seqs == pytest.approx(0.0, abs=1e-6)
    assert "+0.0200 x prompts past the first" in mixed_terms_text(fit)
