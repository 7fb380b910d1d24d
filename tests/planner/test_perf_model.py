"""The performance model against synthetic profiles whose true step times are known formulas."""

from __future__ import annotations

import json
import subprocess
import sys
import timeit

import pytest

from tandem.planner.perf_model import PerfModel, holdout_error
from tandem.planner.serving_fit import (StepInterval, fit_prefill_serving, fit_serving_overhead,
                                        fit_step_intervals)

# Known formulas, in seconds, shaped like a real device: a flat weight-read floor for short
# prefills, attention work growing with cached context, decode linear in batch and KV read.
WEIGHTS_S, PER_TOKEN_S, ATTN_S = 4e-3, 2.5e-5, 1e-10
DECODE_A_S, DECODE_B_S, DECODE_C_S = 5e-3, 2e-5, 4e-9
MIXED_A_S, MIXED_TOKEN_S, MIXED_SEQ_S, MIXED_CONTEXT_S = 6e-3, 2.4e-5, 1e-5, 2e-9
LATENCY_S, BYTES_PER_S = 1.5e-5, 4e11


def prefill_true(new: int, cached: int) -> float:
    return max(WEIGHTS_S, PER_TOKEN_S * new) + ATTN_S * new * (cached + new / 2)


def decode_true(batch: int, context: int) -> float:
    return DECODE_A_S + DECODE_B_S * batch + DECODE_C_S * context


def mixed_true(new: int, cached: int, batch: int, context: int) -> float:
    # an eager step: host floor, tokens through the weights, attention, decode rows' KV read
    return (MIXED_A_S + MIXED_TOKEN_S * (new + batch) + ATTN_S * new * (cached + new / 2)
            + MIXED_SEQ_S * batch + MIXED_CONTEXT_S * context)


def synthetic_profile() -> dict:
    news = [16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
    cacheds = [0, 1024, 4096, 16384, 65536]
    batches = [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256]
    contexts = [128, 512, 2048, 8192, 32768]
    mixed = [(n, c, b, l) for n in (128, 512, 2048) for c in (0, 4096) for b in (8, 64, 192)
             for l in (1024, 4096)]
    return {
        "model": "synthetic", "block_size": 16, "kv_bytes_per_token": 131072,
        "prefill": [{"num_new_tokens": n, "num_cached_tokens": c, "seconds": prefill_true(n, c)}
                    for c in cacheds for n in news],
        "decode": [{"batch_size": b, "num_context_tokens": b * l,
                    "seconds": decode_true(b, b * l)} for b in batches for l in contexts],
        "mixed": [{"num_prefill_tokens": n, "num_prefill_cached_tokens": c, "num_decode_seqs": b,
                   "num_decode_context_tokens": b * l, "seconds": mixed_true(n, c, b, b * l)}
                  for n, c, b, l in mixed],
        "transfer": {"method": "synthetic", "points": [
            {"num_bytes": 2**21 * k, "seconds": LATENCY_S + 2**21 * k / BYTES_PER_S}
            for k in (1, 2, 4, 16, 64, 256, 1024)]},
    }


@pytest.fixture(scope="module")
def model() -> PerfModel:
    return PerfModel.from_profile(synthetic_profile())


def test_reproduces_the_measured_points(model: PerfModel):
    profile = synthetic_profile()
    for p in profile["prefill"]:
        assert model.prefill_s(p["num_new_tokens"], p["num_cached_tokens"]) == \
            pytest.approx(p["seconds"], rel=1e-9)
    for p in profile["decode"]:
        assert model.decode_s(p["batch_size"], p["num_context_tokens"]) == \
            pytest.approx(p["seconds"], rel=1e-9)
    for p in profile["mixed"]:
        predicted = model.step_s(p["num_prefill_tokens"], p["num_prefill_cached_tokens"],
                                 p["num_decode_seqs"], p["num_decode_context_tokens"])
        assert predicted == pytest.approx(p["seconds"], rel=1e-6)
    assert model.block_size == 16 and model.kv_bytes_per_token == 131072


@pytest.mark.parametrize("new,cached", [(20, 0), (100, 500), (700, 2000), (5000, 10000),
                                        (8192, 100000), (12000, 0)])
def test_prefill_between_and_beyond_the_grid(model: PerfModel, new: int, cached: int):
    assert model.prefill_s(new, cached) == pytest.approx(prefill_true(new, cached), rel=0.06)


@pytest.mark.parametrize("batch,context", [(3, 300), (50, 50 * 3000), (200, 200 * 700),
                                           (256, 256 * 40000), (300, 300 * 100)])
def test_decode_is_exact_for_a_linear_device(model: PerfModel, batch: int, context: int):
    assert model.decode_s(batch, context) == pytest.approx(decode_true(batch, context), rel=1e-9)


def test_step_dispatches_by_kind(model: PerfModel):
    assert model.step_s(0, 0, 0, 0) == 0.0
    assert model.step_s(512, 1024, 0, 0) == model.prefill_s(512, 1024)
    assert model.step_s(0, 0, 32, 32 * 1000) == model.decode_s(32, 32 * 1000)
    assert model.step_s(300, 0, 20, 20 * 2000) == \
        pytest.approx(mixed_true(300, 0, 20, 20 * 2000), rel=1e-6)
    # beyond the mixed grid the regression still follows the formula it was fitted to
    assert model.step_s(8192, 32768, 256, 256 * 2000) == \
        pytest.approx(mixed_true(8192, 32768, 256, 256 * 2000), rel=1e-6)
    # more work never takes less time
    assert model.step_s(1024, 0, 64, 64 * 4096) > model.step_s(1024, 0, 0, 0)


def test_transfer_is_latency_plus_bandwidth(model: PerfModel):
    for num_bytes in (2**20, 3 * 2**21, 2**30, 2**33):
        assert model.transfer_s(num_bytes) == \
            pytest.approx(LATENCY_S + num_bytes / BYTES_PER_S, rel=1e-6)
    assert model.transfer_s(0) == 0.0


def test_mixed_is_never_below_its_decode_batch(model: PerfModel):
    assert model.step_s(1, 0, 256, 256 * 100_000) >= model.decode_s(256, 256 * 100_000)


def test_few_mixed_points_fall_back_to_prefill_plus_decode_context():
    profile = synthetic_profile()
    profile["mixed"] = profile["mixed"][:2]
    model = PerfModel.from_profile(profile)
    expected = (model.prefill_s(300 + 20, 0) + model.decode_s(20, 20 * 2000)
                - model.decode_s(20, 20))
    assert model.step_s(300, 0, 20, 20 * 2000) == pytest.approx(expected)


def test_a_chunk_after_a_longer_prefix_than_the_mixed_points_grows_as_the_prefill_curves():
    # A device whose attention cost bends over long prefixes; the mixed points stop at 4096
    # cached tokens, the prefill points go to 65536. Past 4096 a line through the mixed points
    # overcharges (as on the H200), the prefill curves know the bend.
    def bent(cached: int) -> float:
        return cached / (1 + cached / 20_000)

    def prefill(new: int, cached: int) -> float:
        return max(WEIGHTS_S, PER_TOKEN_S * new) + ATTN_S * new * (bent(cached) + new / 2)

    def mixed(new: int, cached: int, batch: int, context: int) -> float:
        return mixed_true(new, cached, batch, context) + prefill(new, cached) - prefill(new, 0) \
            - ATTN_S * new * cached

    profile = synthetic_profile()
    for p in profile["prefill"]:
        p["seconds"] = prefill(p["num_new_tokens"], p["num_cached_tokens"])
    for p in profile["mixed"]:
        p["seconds"] = mixed(p["num_prefill_tokens"], p["num_prefill_cached_tokens"],
                             p["num_decode_seqs"], p["num_decode_context_tokens"])
    model = PerfModel.from_profile(profile)

    def prefix_s(step, cached: int) -> float:   # what the prefix adds to the chunk's step
        return step(2048, cached, 64, 64 * 4096) - step(2048, 0, 64, 64 * 4096)

    for cached in (4096, 16384):   # the mixed points' longest prefix, and a prefill grid point
        want = prefix_s(mixed, cached)
        assert prefix_s(model.step_s, cached) == pytest.approx(want, rel=0.03), cached
    line = prefix_s(mixed, 4096) * 16384 / 4096   # what a line through the mixed points charges
    assert line > 1.5 * prefix_s(mixed, 16384)


def test_serving_overhead_is_recovered_from_observed_decode_steps(model: PerfModel):
    # Steps a serving worker would show: the model's decode step plus 0.4 ms a step and 70 us a
    # sequence, and a few steps mis-read from token timestamps (split or merged) among them.
    steps = [(decode_true(b, c) + 4e-4 + 7e-5 * b, b, c)
             for b in (1, 2, 4, 8, 16, 24, 32) for c in (b * 1000, b * 4000, b * 4200)]
    steps += [(1e-3, 8, 8000), (0.2, 16, 64000)]
    per_step_s, per_seq_s = fit_serving_overhead(model, steps)
    assert per_step_s == pytest.approx(4e-4, abs=2e-5)
    assert per_seq_s == pytest.approx(7e-5, rel=0.02)
    with pytest.raises(ValueError, match="two batch sizes"):
        fit_serving_overhead(model, [(0.01, 8, 8000)])


def test_prefill_serving_costs_are_recovered_from_first_tokens(model: PerfModel):
    # One FIFO prefill worker, 4096-token prompts in two 2048-token chunks, 2 us a prompt token
    # over the model, 1 ms before the worker, an answer held 15 ms when another prompt waits.
    token_s, launch_s, fixed_s = 2e-6, 15e-3, 1e-3
    service_s = model.prefill_s(2048, 0) + model.prefill_s(2048, 2048) + 4096 * token_s
    starts = [0.0, 1.0, 1.02, 1.03, 1.04, 1.05, 3.0, 5.0, 5.01, 5.02, 7.0]
    free_s, done = 0.0, []
    for start_s in starts:
        free_s = max(free_s, start_s + fixed_s) + service_s
        done.append(free_s)
    records = []
    for i, (start_s, done_s) in enumerate(zip(starts, done)):
        waits = i + 1 < len(starts) and starts[i + 1] + fixed_s < done_s
        records.append((start_s, done_s + (launch_s if waits else 0.0) - start_s, 4096))
    fit = fit_prefill_serving(model, records, 2048)
    assert fit.prefill_token_overhead_s == pytest.approx(token_s, abs=1e-9)
    assert fit.fixed_s == pytest.approx(fixed_s, abs=1e-6)
    assert fit.chunk_launch_s == pytest.approx(launch_s, abs=1e-6)
    assert (fit.num_mid, fit.num_isolated, fit.num_heads) == (2, 3, 2)
    with pytest.raises(ValueError, match="busier run"):
        fit_prefill_serving(model, records[:1], 2048)


def test_step_log_costs_are_recovered_from_every_kind_of_step(model: PerfModel):
    # A step log of an aggregated worker: each step's interval is the model's price plus 0.3 ms a
    # step and 20 us a sampled token or, with a prompt chunk, 1.5 us a prompt token instead.
    def step(new: int, cached: int, seqs: int, context: int, sampled: int) -> StepInterval:
        interval = (model.step_s(new, cached, seqs, context) + 3e-4
                    + (1.5e-6 * new if new else 2e-5 * sampled))
        return StepInterval(interval, new, cached, seqs, context, sampled)

    steps = [step(0, 0, b, b * c, b) for b in (1, 4, 8, 16, 32) for c in (1000, 4000)]
    steps += [step(n, 0, b, b * 2000, b + 1) for n in (512, 2048) for b in (0, 8, 32)]
    fit = fit_step_intervals(model, steps)
    assert fit.step_overhead_s == pytest.approx(3e-4, abs=1e-6)
    assert fit.token_overhead_s == pytest.approx(2e-5, rel=1e-3)
    assert fit.prefill_token_overhead_s == pytest.approx(1.5e-6, rel=1e-3)
    assert (fit.num_decode, fit.num_chunk) == (10, 6)
    with pytest.raises(ValueError, match="prompt chunk"):
        fit_step_intervals(model, steps[:10])


def test_a_prompt_step_the_device_waited_for_costs_its_own_overhead(model: PerfModel):
    # Prompt steps queued before the hand-back cost 1.5 us a prompt token over the model; those
    # that were not (the device idle while their inputs were built) 2 ms more.
    def step(new: int, seqs: int, early: bool) -> StepInterval:
        sampled = seqs + bool(new)
        interval = (model.step_s(new, 0, seqs, seqs * 2000) + 3e-4
                    + (1.5e-6 * new if new else 2e-5 * sampled)
                    + (0.0 if early or not new else 2e-3))
        return StepInterval(interval, new, 0, seqs, seqs * 2000, sampled, early)

    steps = [step(0, b, False) for b in (1, 4, 8, 16, 32)]
    steps += [step(n, b, early) for n in (256, 512, 1024, 2048, 4096) for b in (4, 32)
              for early in (False, True)]
    fit = fit_step_intervals(model, steps)
    assert fit.prefill_token_overhead_s == pytest.approx(1.5e-6, rel=1e-3)
    assert fit.chunk_overhead_s == pytest.approx(2e-3, rel=1e-3)
    assert (fit.num_chunk, fit.num_first) == (20, 10)
    # Fewer steps not queued early than a fit of their own needs: all price the token.
    few = [s for s in steps if s.queued_early or s.prefill_tokens != 4096]
    fit = fit_step_intervals(model, few)
    assert fit.chunk_overhead_s == 0.0 and fit.num_first == 0
    # A log without steps queued early (a prefill worker's): every prompt step prices the token.
    fit = fit_step_intervals(model, [s for s in steps if not s.queued_early])
    assert fit.chunk_overhead_s == 0.0 and fit.num_first == 0


def test_no_transfer_points_says_so():
    profile = synthetic_profile()
    profile["transfer"] = {"points": [], "note": "one device"}
    with pytest.raises(ValueError, match="transfer"):
        PerfModel.from_profile(profile).transfer_s(2**21)


def test_holdout_error_is_small_on_a_smooth_device():
    report = holdout_error(synthetic_profile(), fraction=0.2, seed=0)
    assert set(report) == {"prefill", "decode", "mixed", "transfer"}
    assert report["prefill"]["num_points"] == 15
    assert report["decode"]["max"] < 1e-6
    assert report["prefill"]["p90"] < 0.1
    assert report["mixed"]["max"] < 1e-6
    for kind in report.values():
        assert 0.0 <= kind["p90"] <= kind["max"] and kind["mean"] <= kind["max"]


def test_holdout_error_sees_a_misfit():
    profile = synthetic_profile()
    for p in profile["decode"][::3]:
        p["seconds"] *= 2  # a device that is not linear: held-back points must show it
    assert holdout_error(profile, seed=1)["decode"]["max"] > 0.2


def test_prediction_is_fast(model: PerfModel):
    per_call_s = timeit.timeit(lambda: model.step_s(700, 3000, 40, 40 * 1500), number=20000) / 20000
    assert per_call_s < 50e-6  # a few microseconds on a quiet machine; generous for CI


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(synthetic_profile()))
    assert PerfModel.load(str(path)).decode_s(8, 8000) == pytest.approx(decode_true(8, 8000))


def test_imports_without_torch_or_grpc():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['grpc'] = None\n"
            "from tandem.planner.perf_model import PerfModel, holdout_error\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_decode_steps_are_decode_s_step_by_step():
    from tandem.planner.sim_synthetic import synthetic_profile
    from pathlib import Path
    shipped = Path(__file__).parents[2] / "planner/profiles/random-llama-3.1-8b-h200.json"
    for model in (PerfModel.from_profile(synthetic_profile()), PerfModel.load(str(shipped))):
        for batch_size, first in [(1, 10), (7, 3_000), (64, 200_000), (500, 10_000_000)]:
            expected = [model.decode_s(batch_size, first + batch_size * j) for j in range(50)]
            assert model.decode_steps_s(batch_size, first, 50) == expected  # exactly


def test_a_decode_curve_past_its_points_takes_the_far_slope_of_a_batch_measured_further():
    # Per context token a step costs more at short contexts (launch-bound splits) and falls to
    # the KV read's cost, the same at every batch; batch 1 was measured only to 2k tokens.
    def step_s(batch: int, context: int) -> float:
        return 1e-3 + 2e-5 * batch + 2.7e-8 * context + 1e-4 * min(context, 2048) / 2048

    points = [(1, c) for c in (128, 512, 2048)] + [(2, c) for c in (256, 4096, 16384, 65536)]
    profile = {**synthetic_profile(), "decode": [
        {"batch_size": b, "num_context_tokens": c, "seconds": step_s(b, c)} for b, c in points]}
    model = PerfModel.from_profile(profile)
    for context in (8192, 32768, 131072):
        assert model.decode_s(1, context) == pytest.approx(step_s(1, context), rel=1e-6)
    steps = model.decode_steps_s(1, 30000, 20)
    assert steps == [model.decode_s(1, 30000 + j) for j in range(20)]  # exactly


def test_steps_are_priced_at_the_rows_their_graph_bucket_computes():
    """A profile measured with step graphs ran each point at its bucket's rows; serving with a
    smaller step budget pads to that budget's buckets (engine/step_buckets.py)."""
    def padded_true(rows: int) -> float:
        return WEIGHTS_S + PER_TOKEN_S * rows

    profile = synthetic_profile()
    profile["engine"] = {"step_graph_max_tokens": 8192}
    for p in profile["prefill"]:
        if p["num_cached_tokens"] == 0:
            p["seconds"] = padded_true(p["num_new_tokens"])  # grid sizes are buckets themselves
    for p in profile["mixed"]:  # 2048 + 8 decodes ran as 2304 rows, 512 + 8 as 576, ...
        rows = {136: 160, 520: 576, 2056: 2304}.get(p["num_prefill_tokens"]
                                                    + p["num_decode_seqs"])
        if rows is not None:
            p["seconds"] = mixed_true(rows - p["num_decode_seqs"], p["num_prefill_cached_tokens"],
                                      p["num_decode_seqs"], p["num_decode_context_tokens"])
    model = PerfModel.from_profile(profile)
    assert model.graph_tokens == 8192
    # as measured, under the profile's own budget: 2056 rows cost 2304's
    assert model.step_s(2048, 0, 8, 8 * 1024) > model.step_s(2040, 0, 8, 8 * 1024, step_budget=2048)
    # a 100-token prompt runs as 128 rows; under a 100-token budget as exactly 100
    assert model.prefill_s(100) == pytest.approx(padded_true(128), rel=0.02)
    assert model.prefill_s(100, step_budget=100) == pytest.approx(model.prefill_s(100, 0, 100))
    assert model.prefill_s(100, step_budget=100) < model.prefill_s(100)
    # a profile measured without step graphs is read as it was
    eager = PerfModel.from_profile(synthetic_profile())
    assert eager.graph_tokens is None
    assert eager.prefill_s(100) == eager.prefill_s(100, step_budget=2048)


def test_a_decode_step_is_priced_at_the_batch_its_graph_runs():
    # Decode graphs are captured at 1, 2, 4, 8, 16, 32, 48, ...: 17 sequences run as 32, with the
    # padding rows reading no KV. A profile measured with graphs prices them so; one measured
    # eagerly prices each batch at its own size.
    from tandem.engine.step_buckets import padded_batch

    profile = synthetic_profile()
    eager = PerfModel.from_profile(profile)
    profile["engine"] = {"cuda_graphs": True, "max_num_seqs": 256}
    graphs = PerfModel.from_profile(profile)
    assert padded_batch(17, 256) == 32 and padded_batch(33, 256) == 48
    assert padded_batch(300, 256) == 300
    for batch in (17, 20, 31):
        assert graphs.decode_s(batch, batch * 1000) == pytest.approx(
            eager.decode_s(32, batch * 1000))
        assert graphs.step_s(0, 0, batch, batch * 1000) == graphs.decode_s(batch, batch * 1000)
        assert graphs.decode_steps_s(batch, batch * 1000, 3)[0] == pytest.approx(
            graphs.decode_s(batch, batch * 1000))
    assert graphs.decode_s(16, 16000) == pytest.approx(eager.decode_s(16, 16000))
    # a mixed step runs as token-count pieces: its decode rows are not padded to a decode graph
    assert graphs.step_s(256, 0, 17, 17000) == pytest.approx(eager.step_s(256, 0, 17, 17000))
    profile["engine"]["decode_graph_max_batch"] = 64   # recorded by newer profiles
    assert PerfModel.from_profile(profile).decode_s(100, 100_000) == pytest.approx(
        eager.decode_s(100, 100_000))


def test_each_prompt_past_the_first_in_a_step_costs_its_own_overhead(model: PerfModel):
    # Steps queued early: 1.5 us a prompt token, and 1.2 ms for each prompt past the first.
    def step(new: int, prompts: int) -> StepInterval:
        interval = (model.step_s(new, 0, 8, 16000) + 3e-4 + 1.5e-6 * new
                    + 1.2e-3 * (prompts - 1))
        return StepInterval(interval, new, 0, 8, 16000, 8 + prompts, True, prompts)

    decode = [StepInterval(model.step_s(0, 0, b, b * 2000) + 3e-4 + 2e-5 * b, 0, 0, b, b * 2000,
                           b) for b in (1, 4, 8, 16, 32)]
    steps = decode + [step(n, p) for n in (256, 512, 1024, 2048) for p in (1, 1, 2, 3, 4)]
    fit = fit_step_intervals(model, steps)
    assert fit.prefill_token_overhead_s == pytest.approx(1.5e-6, rel=1e-3)
    assert fit.extra_prompt_overhead_s == pytest.approx(1.2e-3, rel=1e-3)
    assert fit.num_several == 12
    # Fewer steps of several prompts than a fit of their own needs: no such cost.
    fit = fit_step_intervals(model, [s for s in steps if s.prompts < 3])
    assert fit.extra_prompt_overhead_s == 0.0 and fit.num_several == 0
