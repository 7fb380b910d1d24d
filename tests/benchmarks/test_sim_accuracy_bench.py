"""benchmarks/sim_accuracy_bench.py: each case's seed, and the real run's arrivals replayed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.sim_accuracy_bench import Plan, cases, replay_arrivals
from tandem.bench.trace import TraceConfig, load_trace_dataset


def _seeds(plan: Plan) -> dict[str, str]:
    return {case.name: case.workload[case.workload.index("--seed") + 1]
            for case in cases(Path("trace.jsonl"), plan)}


def test_a_case_keeps_its_seed_in_any_subset():
    full = _seeds(Plan(rates=(3, 6, 9), short_long_rates=(13,), trace_scales=(1.0, 0.5, 0.3)))
    assert len(set(full.values())) == len(full)  # each case its own prompts
    alone = {**_seeds(Plan(rates=(9,), trace_scales=())),
             **_seeds(Plan(rates=(), short_long_rates=(13,), trace_scales=(0.3,)))}
    assert alone == {name: full[name] for name in alone}
    # Reordering the plan does not move a seed either.
    assert _seeds(Plan(rates=(9, 3), trace_scales=(0.5, 1.0))) == {
        name: full[name] for name in ("isl4096-osl256-9rps", "isl4096-osl256-3rps",
                                      "trace-x2.0", "trace-x1.0")}


def _trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 0, "input_length": 512, "output_length": 4, "hash_ids": [0]},
            {"timestamp": 3000, "input_length": 512, "output_length": 4, "hash_ids": [1]},
            {"timestamp": 3000, "input_length": 1024, "output_length": 4, "hash_ids": [1, 2]},
            {"timestamp": 6000, "input_length": 512, "output_length": 4, "hash_ids": [3]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    return path


def test_replay_sends_each_trace_request_when_the_real_client_did(tmp_path):
    trace = _trace(tmp_path)
    flags = ("--dataset", f"trace:{trace}", "--num-requests", "3", "--time-scale", "0.5",
             "--seed", "7")
    # The real client sent request 2 before request 1, though the trace has them at one instant.
    real = {"per_request": [{"request_index": 0, "start_s": 0.001},
                            {"request_index": 2, "start_s": 1.5021},
                            {"request_index": 1, "start_s": 1.5034}]}
    out = tmp_path / "arrivals.jsonl"
    replayed = replay_arrivals(flags, real, out)
    assert replayed == ("--dataset", f"trace:{out}", "--num-requests", "3", "--time-scale", "1",
                        "--seed", "7")
    requests = load_trace_dataset(TraceConfig(str(out), num_requests=3, block_tokens=128), 7)
    assert [r.arrival_offset_s for r in requests] == pytest.approx([0.0, 1.5024, 1.5011])
    original = load_trace_dataset(TraceConfig(str(trace), num_requests=3, block_tokens=128), 7)
    assert [r.prompt_token_ids for r in requests] == [r.prompt_token_ids for r in original]
    assert [r.output_len for r in requests] == [r.output_len for r in original]


def test_replay_leaves_other_workloads_and_checks_the_records(tmp_path):
    flags = ("--dataset", "random", "--request-rate", "6", "--seed", "2")
    assert replay_arrivals(flags, {"per_request": [{"request_index": 0, "start_s": 0.0}]},
                           tmp_path / "x.jsonl") == flags
    trace_flags = ("--dataset", f"trace:{_trace(tmp_path)}", "--num-requests", "2")
    with pytest.raises(ValueError, match="one per request"):
        replay_arrivals(trace_flags, {"per_request": [{"request_index": 1, "start_s": 0.0},
                                                      {"request_index": 1, "start_s": 0.1}]},
                        tmp_path / "y.jsonl")
    with pytest.raises(ValueError, match="the trace has 4 rows"):
        replay_arrivals(trace_flags, {"per_request": [{"request_index": i, "start_s": 0.0}
                                                      for i in range(5)]},
                        tmp_path / "z.jsonl")


def test_per_request_error_compares_each_request_with_itself():
    from benchmarks.sim_accuracy_bench import per_request_error

    def run(ttfts):
        return {"per_request": [{"request_index": i, "ttft_ms": t, "error": None}
                                for i, t in enumerate(ttfts)]}

    # one request of five twice as fast moves the p50 from 300 to 210 (-30%); the median
    # request is 5% slower
    real, sim = run([100, 200, 300, 400, 500]), run([105, 210, 150, 420, 525])
    assert per_request_error(real, sim, "ttft_ms") == pytest.approx(0.05)
    assert per_request_error(run([100, 200, 400]), run([110, 180, 400]),
                             "ttft_ms") == pytest.approx(0.0)
    failed = {"per_request": [{"request_index": 0, "ttft_ms": None, "error": "timeout"}]}
    assert per_request_error(failed, run([5]), "ttft_ms") is None
    assert per_request_error({}, run([5]), "ttft_ms") is None


def test_overheads_are_fitted_on_one_case_of_a_step_log(tmp_path):
    from benchmarks.serving_overheads import fit_step_log_overheads, write_serving_section
    from tandem.planner.perf_model import PerfModel
    from tandem.planner.sim_synthetic import synthetic_profile

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(synthetic_profile()))
    model = PerfModel.load(str(profile))
    # Two cases against one server: the first adds 0.2 ms a step and 10 us a sampled token or,
    # with a chunk, 2 us a prompt token instead, and 3 ms to the prompt step after a step that did not
    # decode (not queued early: the one after decode steps is); the second, twice as much. Ten
    # rounds a case: a fit of the steps not queued early needs ten of them.
    steps, now = [], 0.0
    for case, scale in (("a", 1.0), ("b", 2.0)):
        for new, seqs in 10 * ([(0, b) for b in (1, 2, 4, 8, 16, 32)] + [(1024, 0), (2048, 16),
                                                                        (0, 17)]):
            sampled = seqs + bool(new)
            thread = model.step_s(new, 0, seqs, seqs * 3000)
            interval = thread + scale * (2e-4 + (2e-6 * new if new else 1e-5 * sampled)
                                         + (3e-3 if new == 2048 else 0.0))
            steps.append({"began_s": now, "ended_s": now + thread, "resumed_s": now + thread,
                          "at_s": 100.0 * scale, "prefill_tokens": new, "cached_tokens": 0,
                          "decode_seqs": seqs, "context_tokens": seqs * 3000,
                          "sampled": sampled})
            now += interval
    log = tmp_path / "steps-1agg" / "decode-0.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps(s) + "\n" for s in steps))
    (log.parent / "cases.json").write_text(json.dumps(
        [{"case": "a", "start_s": 50.0, "end_s": 150.0},
         {"case": "b", "start_s": 150.0, "end_s": 250.0}]))
    flags = dict(zip(*[iter(fit_step_log_overheads(log, str(profile), "a"))] * 2))
    assert flags == {"--step-overhead-ms": "0.20", "--token-overhead-us": "10",
                     "--chunk-overhead-ms": "3.00", "--prefill-token-overhead-us": "2.00",
                     "--extra-prompt-overhead-ms": "0.00"}   # (a log of one prompt a step)
    write_serving_section(str(profile), list(sum(flags.items(), ())), "the step log, case a")
    serving = json.loads(profile.read_text())["serving"]
    assert serving["token_overhead_us"] == 10.0 and serving["prefill_token_overhead_us"] == 2.0
    assert "case a" in serving["measured"]
    # A log with host times also gives the launch a step with prompt tokens takes: the median
    # of those steps' host times (here 3, 5 and 8 ms; decode steps' are not counted).
    first = steps[:9] + steps[90:99]   # each case's first round
    for step, host_ms in zip(first, ([1.0] * 6 + [3.0, 5.0, 1.0] + [1.0] * 6 + [8.0, 9.0, 1.0])):
        step["host_s"] = host_ms / 1e3
    log.write_text("".join(json.dumps(s) + "\n" for s in first[:-2]))
    flags = dict(zip(*[iter(fit_step_log_overheads(log, str(profile), None))] * 2))
    assert flags["--prompt-launch-ms"] == "5.0"


def test_the_request_path_is_read_off_requests_sent_to_an_idle_worker():
    from benchmarks.serving_overheads import request_path_s

    def step(began, resumed, prompt):
        return {"began_s": began, "ended_s": resumed, "resumed_s": resumed,
                "at_s": 1000.0 + resumed, "prefill_tokens": prompt}

    steps = [step(0.0, 0.010, 0), step(0.020, 0.030, 512), step(0.030, 0.040, 0),
             step(0.050, 0.060, 0), step(0.090, 0.100, 2048)]
    # Sent at 1000.012 (idle, its prompt step began 8 ms later) and 1000.084 (idle, 6 ms): both
    # count. Sent during a step (1000.035), or before a step without prompt tokens (1000.045):
    # neither does.
    assert request_path_s(steps, [1000.012, 1000.035, 1000.045, 1000.084]) == pytest.approx(0.007)
    assert request_path_s(steps, [1000.035]) is None
    assert request_path_s([], [1000.0]) is None


def test_a_step_queued_early_takes_its_launch_back_from_the_interval_before():
    # decode, a chunk and a prompt's 4-token tail both queued before the hand-back (launched at
    # the end of the call before, 6 and 5 ms), a decode step launched in its own call, and one
    # after an idle gap. Milliseconds.
    from benchmarks.serving_overheads import device_spans_s

    def step(began, ended, resumed, host, new, seqs):
        return {"began_s": began / 1e3, "ended_s": ended / 1e3, "resumed_s": resumed / 1e3,
                "host_s": host / 1e3, "prefill_tokens": new, "decode_seqs": seqs}

    steps = [step(0.0, 7.0, 7.2, 0.5, 0, 2), step(7.4, 15.4, 15.6, 6.0, 2046, 2),
             step(15.8, 16.3, 16.4, 5.0, 4, 2), step(16.6, 18.3, 18.4, 0.7, 0, 3),
             step(118.4, 120.0, 120.1, 0.7, 0, 3)]
    spans = device_spans_s(steps)
    assert spans[0] is None
    # The chunk: its launch, the loop's relay of the decode step's tokens, its device wait.
    assert [round(s * 1e3, 6) for s in spans[1:]] == [9.4, 5.9, 2.0, 1.6]
    del steps[2]["host_s"]   # a log without host times has no spans
    assert device_spans_s(steps) == [None] * 5


def test_a_step_after_one_the_engine_did_not_wait_for_is_left_out_of_the_fit(tmp_path):
    # A chunk that samples nothing is not waited for: the step after it holds its device work.
    # Such steps (50 ms longer here) must not move the fitted costs.
    from benchmarks.serving_overheads import fit_step_log_overheads
    from tandem.planner.perf_model import PerfModel
    from tandem.planner.sim_synthetic import synthetic_profile

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(synthetic_profile()))
    model = PerfModel.load(str(profile))

    def log(with_unwaited: bool) -> dict:
        steps, now = [], 0.0
        shapes = 12 * ([(0, b, b) for b in (1, 2, 4, 8, 16, 32)] + [(2048, 16, 17)])
        if with_unwaited:
            shapes += 12 * [(2048, 0, 0), (2048, 0, 1)]
        for i, (new, seqs, sampled) in enumerate(shapes):
            thread = model.step_s(new, 0, seqs, seqs * 3000)
            extra = 0.05 if i and shapes[i - 1][2] == 0 else 0.0
            interval = thread + 2e-4 + (2e-6 * new if new else 1e-5 * sampled) + extra
            steps.append({"began_s": now, "ended_s": now + interval - 1e-4,
                          "resumed_s": now + interval - 1e-4, "at_s": 100.0,
                          "prefill_tokens": new, "cached_tokens": 0, "decode_seqs": seqs,
                          "context_tokens": seqs * 3000, "sampled": sampled})
            now += interval
        path = tmp_path / f"steps-{with_unwaited}" / "decode-0.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(s) + "\n" for s in steps))
        return dict(zip(*[iter(fit_step_log_overheads(path, str(profile), None))] * 2))

    without, with_unwaited = log(False), log(True)
    assert with_unwaited == without and without["--prefill-token-overhead-us"] == "2.00"
