"""Serving overheads for `tandem simulate`, fitted on a real run: what a serving worker adds to the
profile's bare steps (the `overheads` phase of benchmarks/sim_accuracy_bench.py).

- `fit_overheads`: from a 1P:1D run's client-side tokens (decode steps read off the token times,
  the prefill worker's per-token cost, answer hold and fixed cost off the TTFTs);
- `fit_step_log_overheads`: from any worker's step log (engine/step_log.py): each step's span on
  the device's timeline (`device_spans_s`) against the model's price, and the serving path in
  before a request's prompt step starts (`request_path_s`, pooled over the runs beside the log);
- `write_serving_section`: the fitted flags stored as a profile's `serving` section.
"""

from __future__ import annotations

import bisect
import json
import statistics
import time
from pathlib import Path

STEP_GAP_S = 3e-3        # tokens of one step reach the client within this of the first
MIN_DECODE_STEP_S = 4e-3  # below any decode step on the profiled GPU: a step read as two
MAX_DECODE_STEP_S = 30e-3  # above: a prefill chunk rode in the step (a local prefill)
STEP_LOG_IDLE_S = 0.05   # a step log's gap past this between steps is idle, not the loop's work


def decode_steps(real: dict) -> list[tuple[float, int, int]]:
    """(duration_s, batch size, context tokens) of each decode step of a run's only decode worker.

    The first token comes from the prefill worker; every later token was sampled by the decode
    worker, and all tokens of one step reach the client within STEP_GAP_S. A step's duration is
    the time from the previous step's tokens to its own.
    """
    tokens = []
    for record in real["per_request"]:
        if record["error"] is not None or record["ttft_ms"] is None:
            continue
        time_s = record["start_s"] + record["ttft_ms"] / 1e3
        for num_output, gap_ms in enumerate(record["itl_ms"], start=1):
            time_s += gap_ms / 1e3
            tokens.append((time_s, record["prompt_tokens"] + num_output))
    tokens.sort()
    steps: list[list] = []  # [first token time, batch size, context tokens]
    for time_s, context in tokens:
        if steps and time_s - steps[-1][0] < STEP_GAP_S:
            steps[-1][1] += 1
            steps[-1][2] += context
        else:
            steps.append([time_s, 1, context])
    return [(step[0] - before[0], step[1], step[2]) for before, step in zip(steps, steps[1:])
            if MIN_DECODE_STEP_S < step[0] - before[0] < MAX_DECODE_STEP_S]


def fit_overheads(run_path: Path, profile: str, chunk_tokens: int) -> list[str]:
    """tandem simulate's serving flags, from one real run with one prefill and one decode worker.

    Every prompt must have been prefilled on the prefill worker: none shorter than the router's
    remote_prefill_min_tokens, never more than max_prefill_queue waiting. The conversation trace
    breaks both (its short prompts and the overflow of its bursts go to the decode worker), so its
    prefill figures are not the prefill worker's."""
    from tandem.planner.perf_model import PerfModel
    from tandem.planner.serving_fit import fit_prefill_serving, fit_serving_overhead

    real = json.loads(run_path.read_text())
    model = PerfModel.load(profile)
    steps = decode_steps(real)
    per_step_s, per_seq_s = fit_serving_overhead(model, steps)
    print(f"{run_path.name}: {len(steps)} decode steps; serving adds {per_step_s * 1e3:.2f} ms "
          f"a step and {per_seq_s * 1e6:.0f} us a sequence to the profile's decode step")
    prefill = fit_prefill_serving(model, [(r["start_s"], r["ttft_ms"] / 1e3, r["prompt_tokens"])
                                          for r in real["per_request"]
                                          if r["error"] is None and r["ttft_ms"] is not None],
                                  chunk_tokens)
    print(f"prefill worker: {prefill.prefill_token_overhead_s * 1e6:.2f} us a prompt token beyond "
          f"the profile ({prefill.num_mid} requests inside a queue), an answer held "
          f"{prefill.chunk_launch_s * 1e3:.1f} ms behind the next chunk ({prefill.num_heads} at a "
          f"queue's head), {prefill.fixed_s * 1e3:.1f} ms fixed ({prefill.num_isolated} alone)")
    return ["--step-overhead-ms", f"{per_step_s * 1e3:.2f}",
            "--token-overhead-us", f"{per_seq_s * 1e6:.0f}",
            # The per-chunk form is replaced by the per-token one: 0 also clears a profile's
            # earlier per-chunk value when these flags are written into it.
            "--chunk-overhead-ms", "0",
            "--prefill-token-overhead-us", f"{prefill.prefill_token_overhead_s * 1e6:.2f}",
            "--chunk-launch-ms", f"{prefill.chunk_launch_s * 1e3:.1f}",
            "--frontend-overhead-ms", f"{prefill.fixed_s * 1e3:.1f}"]


def fit_step_log_overheads(log_path: Path, profile: str, case: str | None) -> list[str]:
    """tandem simulate's per-step serving flags, from a worker's step log (any layout, one
    aggregated worker too). `case`: only the steps of that case (the log's cases.json)."""
    from benchmarks.step_log_report import between, case_spans, load, rows
    from tandem.planner.perf_model import PerfModel
    from tandem.planner.serving_fit import StepInterval, fit_step_intervals

    (steps,) = load([str(log_path)])
    if case is not None:
        ((since, until),) = [(since, until) for name, since, until
                             in case_spans(str(log_path.parent / "cases.json")) if name == case]
        steps = between(steps, since, until)
    model = PerfModel.load(profile)
    # Each step's span on the device's timeline where the log has host times, else its interval
    # from its start to the next step's start (which holds the next step's launch when that one
    # was queued early, and not its own).
    times = device_spans_s(steps)
    if all(time_s is None for time_s in times):
        times = [None if row["loop_s"] is None   # before an idle gap: no loop to read
                 else row["thread_s"] + row["handoff_s"] + row["loop_s"]
                 for row in rows(steps, model, None, STEP_LOG_IDLE_S)]
    # A step after one that sampled nothing: the engine did not wait for that one, whose device
    # work then shows in this step's interval (a prompt's chunks before its last).
    unwaited = [bool(i and not steps[i - 1]["sampled"] and follows_at_once(steps, i))
                for i in range(len(steps))]
    intervals = [StepInterval(time_s, step["prefill_tokens"], step["cached_tokens"],
                              step["decode_seqs"], step["context_tokens"], step["sampled"], early,
                              step.get("prefill_seqs", 1))
                 for step, time_s, early, after in zip(steps, times, queued_early(steps),
                                                       unwaited)
                 if time_s is not None and not after]
    fit = fit_step_intervals(model, intervals)
    print(f"{log_path} ({case or 'every case'}): {fit.num_decode} decode steps and "
          f"{fit.num_chunk} with a prompt chunk ({fit.num_first} not queued early, "
          f"{fit.num_several} queued early with several prompts)")
    flags = ["--step-overhead-ms", f"{fit.step_overhead_s * 1e3:.2f}",
             "--token-overhead-us", f"{fit.token_overhead_s * 1e6:.0f}",
             "--chunk-overhead-ms", f"{fit.chunk_overhead_s * 1e3:.2f}",
             "--prefill-token-overhead-us", f"{fit.prefill_token_overhead_s * 1e6:.2f}",
             "--extra-prompt-overhead-ms", f"{fit.extra_prompt_overhead_s * 1e3:.2f}"]
    launch_s = prompt_launch_s(steps)
    if launch_s is not None:
        flags += ["--prompt-launch-ms", f"{launch_s * 1e3:.1f}"]
    path_s = fit_request_path_s(log_path)
    if path_s is not None:
        flags += ["--frontend-overhead-ms", f"{path_s * 1e3:.1f}"]
    return flags


def queued_early(steps: list[dict]) -> list[bool]:
    """For each step of a log, whether the worker queued it before handing back the step before
    it (engine/lookahead.queues_before_hand_back): a step with prompt tokens right after a step
    that decoded, since its prompt work was there when that step ended (a prompt that arrived
    during a steady decode step was added while the step queued ahead of it ran). Not: one after
    a step without decodes, or after an idle gap."""
    return [bool(i and step["prefill_tokens"] and steps[i - 1]["decode_seqs"]
                 and follows_at_once(steps, i))
            for i, step in enumerate(steps)]


def follows_at_once(steps: list[dict], i: int) -> bool:
    """Whether step i (> 0) of a log began right after the step before it, not after an idle
    gap (one over STEP_LOG_IDLE_S)."""
    return steps[i]["began_s"] - steps[i - 1]["resumed_s"] < STEP_LOG_IDLE_S


def device_spans_s(steps: list[dict]) -> list[float | None]:
    """Each step's span on the device's timeline, what the simulator prices a step at: from the
    moment the engine had the step before it finished (its start, after an idle gap) to the
    moment it had this one finished. A step's interval in the log (one call of the step thread)
    is not that: a step queued before the hand-back of the one before it (`queued_early`) is
    launched at the end of that one's call, after its finish, so its launch (`host_s`) moves
    from that interval to its own. Exact for steps that sample (their tokens are waited for);
    a prompt-only chunk that samples nothing is not waited for, so its device work shows in the
    span of the step after it. None for the first step, and for every step of a log without
    host times."""
    if not steps or any("host_s" not in step for step in steps):
        return [None] * len(steps)
    early = queued_early(steps)
    finished = [step["ended_s"] - (steps[i + 1]["host_s"] if i + 1 < len(steps)
                                   and early[i + 1] else 0.0)
                for i, step in enumerate(steps)]
    spans: list[float | None] = [None]
    for i in range(1, len(steps)):
        start = finished[i - 1] if follows_at_once(steps, i) else steps[i]["began_s"]
        spans.append(finished[i] - start)
    return spans


def prompt_launch_s(steps: list[dict]) -> float | None:
    """The median host time to schedule and launch a step carrying prompt tokens, which the
    tokens of the step before it wait behind (`tandem simulate --prompt-launch-ms`); None for a
    log without host times or without such steps."""
    times = [step["host_s"] for step in steps if step["prefill_tokens"] and "host_s" in step]
    return statistics.median(times) if times else None


def request_path_s(steps: list[dict], sent_epoch_s: list[float]) -> float | None:
    """The median time from a request's send to the start of the worker step that takes its
    prompt, over requests sent while no step ran and answered by the very next step: the serving
    path in (client, frontend, router, the worker's RPC and loop), which `tandem simulate
    --frontend-overhead-ms` charges a request; None when no request qualifies.

    Steps are a worker's step log (engine/step_log.py); its perf-counter times are put on the
    epoch by each line's `at_s` (its `resumed_s` moment, logged in milliseconds)."""
    if not steps:
        return None
    offset = statistics.median(step["at_s"] - step["resumed_s"] for step in steps)
    began = [step["began_s"] + offset for step in steps]
    waits = []
    for sent in sent_epoch_s:
        i = bisect.bisect_left(began, sent)
        if 0 < i < len(steps) and steps[i]["prefill_tokens"] and (
                steps[i - 1]["resumed_s"] + offset < sent):
            waits.append(began[i] - sent)
    return statistics.median(waits) if waits else None


def fit_request_path_s(log_path: Path) -> float | None:
    """`request_path_s` pooled over the real runs beside the log's folder (steps-<layout>/ next
    to real-<layout>-<case>.json, as sim_accuracy_bench.py real writes them)."""
    from benchmarks.step_log_report import load

    (steps,) = load([str(log_path)])
    layout = log_path.parent.name.removeprefix("steps-")
    sent = []
    for run in sorted(log_path.parent.parent.glob(f"real-{layout}-*.json")):
        real = json.loads(run.read_text())
        sent += [real["started_at_epoch_s"] + request["start_s"]
                 for request in real.get("per_request") or []]
    return request_path_s(sorted(steps, key=lambda step: step["began_s"]), sorted(sent))


def write_serving_section(profile_path: str, flags: list[str], source: str) -> None:
    """Store the fitted overheads as the profile's `serving` section, which `tandem simulate` and
    `tandem plan` use when their flags are not given."""
    from tandem.planner.simulate_cli import SERVING_OVERHEADS

    values = dict(zip(flags[::2], flags[1::2]))
    profile = json.loads(Path(profile_path).read_text())
    # An overhead this fit does not give (the frontend's per-token time, from
    # serving_path_bench.py) keeps the profile's value and its own `<name>_measured` note.
    before = profile.get("serving") or {}
    profile["serving"] = {name: float(values.get("--" + name.replace("_", "-"),
                                                 before.get(name, 0.0)))
                          for name in SERVING_OVERHEADS}
    profile["serving"]["measured"] = (f"benchmarks/sim_accuracy_bench.py overheads on "
                                      f"{source}, {time.strftime('%Y-%m-%d')}")
    profile["serving"].update((key, note) for key, note in before.items()
                              if key.endswith("_measured"))
    Path(profile_path).write_text(json.dumps(profile, indent=1) + "\n")
    print(f"wrote the serving overheads into {profile_path}")
