"""A serving worker's step log against the profile's model: where serving time goes beyond the
bare steps a profile times.

Serve with `TANDEM_STEP_LOG_DIR=DIR` in the environment (each worker writes DIR/<worker id>.jsonl,
engine/step_log.py), run the load, then

    python benchmarks/step_log_report.py --profile PROFILE.json DIR/decode-0.jsonl [...]
        [--step-budget 2048] [--cases DIR/cases.json] [--by-shape] [--mixed-terms]

For each kind of step (decode only, a prompt chunk beside decodes, prompt only) it prints how
many there were, the step thread's time over the model's price for the same shape (median and
p90), its span on the device's timeline over that price (a step queued before the hand-back of
the one before it has its launch in that one's thread time: `serving_overheads.device_spans_s`),
the host's time to schedule and queue the step (logs that record `host_s`), and the loop's
share between steps: from the thread's end to the loop taking the tokens (hand-off), and from
there to the next step's start (the loop's own work). The last line splits the log's whole span
into steps, hand-offs, loop work and idle time (no step in flight and none waiting to start: gaps
over --idle-ms). With `--cases` (the cases.json that `sim_accuracy_bench.py
real` writes beside the logs: each case's name and epoch start and end), one report per case.
`--by-shape` splits the kinds finer; `--mixed-terms` fits what mixed steps' time over the model
goes with (`fit_mixed_terms`). `tandem simulate --step-log` writes logs of the same form.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.serving_overheads import device_spans_s
from tandem.planner.perf_model import PerfModel


def load(paths: list[str]) -> list[list[dict]]:
    """Each file's steps, in order."""
    logs = []
    for path in paths:
        with open(path, encoding="utf-8") as file:
            logs.append([json.loads(line) for line in file if line.strip()])
    return logs


def case_spans(path: str) -> list[tuple[str, float, float]]:
    """(case, start, end) in epoch seconds of each case of a cases file: a JSON list of
    {case, start_s, end_s}, written beside the step logs of a run of several cases."""
    with open(path, encoding="utf-8") as file:
        return [(c["case"], c["start_s"], c["end_s"]) for c in json.load(file)]


def between(steps: list[dict], since: float, until: float) -> list[dict]:
    """The steps logged (`at_s`) from since to until."""
    return [s for s in steps if since <= s.get("at_s", 0.0) <= until]


def kind(step: dict) -> str:
    if step["prefill_tokens"] and step["decode_seqs"]:
        return "mixed"
    return "prefill" if step["prefill_tokens"] else "decode"


def shape(step: dict) -> str:
    """The step's kind, finer: decode steps by batch (up to 16 sequences a graph is one
    programmatic-launch chain), a chunk beside decodes by the decodes' context tokens (their
    attention is what grows with it), and steps with prompt tokens of several prompts apart
    (logs that record `prefill_seqs`)."""
    name = kind(step)
    if name == "decode":
        batch = step["decode_seqs"]
        return f"decode, {'1-16' if batch <= 16 else '17-32' if batch <= 32 else '33+'} seqs"
    prompts = ", several prompts" if step.get("prefill_seqs", 1) > 1 else ""
    if name == "mixed":
        context = step["context_tokens"]
        band = "<50k" if context < 50_000 else "50k-150k" if context < 150_000 else "150k+"
        return f"mixed, {band} decode context{prompts}"
    return name + prompts


def rows(steps: list[dict], model: PerfModel, step_budget: int | None, idle_s: float
         ) -> list[dict]:
    """Per step: its kind, the thread's time, the model's price, the hand-off and the loop's
    work before the next step (None for the last step, or before an idle gap), and its span on
    the device's timeline (`serving_overheads.device_spans_s`; None without host times)."""
    out = []
    for step, after, span in zip(steps, steps[1:] + [None], device_spans_s(steps)):
        priced = model.step_s(step["prefill_tokens"], step["cached_tokens"], step["decode_seqs"],
                              step["context_tokens"], step_budget)
        loop_s = None if after is None else after["began_s"] - step["resumed_s"]
        out.append({"kind": kind(step), "shape": shape(step),
                    "thread_s": step["ended_s"] - step["began_s"],
                    "model_s": priced, "host_s": step.get("host_s"),
                    "handoff_s": step["resumed_s"] - step["ended_s"], "span_s": span,
                    "loop_s": loop_s if loop_s is not None and loop_s <= idle_s else None,
                    "idle_s": loop_s if loop_s is not None and loop_s > idle_s else 0.0})
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(steps: list[dict], model: PerfModel, step_budget: int | None, idle_s: float,
           by_shape: bool = False) -> str:
    table = rows(steps, model, step_budget, idle_s)
    lines = ["| steps | count | thread / model, median | p90 | span / model, median | "
             "host ms, median | p90 | hand-off ms, median | loop ms, median | p90 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    field = "shape" if by_shape else "kind"
    order = ("decode", "mixed", "prefill")
    for name in sorted({r[field] for r in table},
                       key=lambda n: (order.index(n.split(",")[0]), _band_order(n),
                                      "several" in n)):
        picked = [r for r in table if r[field] == name]
        ratios = [r["thread_s"] / r["model_s"] for r in picked if r["model_s"] > 0]
        spans = [r["span_s"] / r["model_s"] for r in picked
                 if r["span_s"] is not None and r["model_s"] > 0]
        span = f"{statistics.median(spans):.3f}" if spans else "-"
        loops = [r["loop_s"] * 1e3 for r in picked if r["loop_s"] is not None] or [0.0]
        hosts = [r["host_s"] * 1e3 for r in picked if r["host_s"] is not None]
        host = (f"{statistics.median(hosts):.2f} | {_quantile(hosts, 0.9):.2f}" if hosts
                else "- | -")   # logs before host_s was recorded
        lines.append(f"| {name} | {len(picked)} | {statistics.median(ratios):.3f} | "
                     f"{_quantile(ratios, 0.9):.3f} | {span} | {host} | "
                     f"{statistics.median(r['handoff_s'] * 1e3 for r in picked):.2f} | "
                     f"{statistics.median(loops):.2f} | {_quantile(loops, 0.9):.2f} |")
    span = steps[-1]["resumed_s"] - steps[0]["began_s"]
    parts = {"steps": sum(r["thread_s"] for r in table),
             "hand-offs": sum(r["handoff_s"] for r in table),
             "loop": sum(r["loop_s"] or 0.0 for r in table),
             "idle": sum(r["idle_s"] for r in table)}
    lines.append(f"span {span:.2f} s: " + ", ".join(
        f"{name} {seconds:.2f} s ({seconds / span:.0%})" for name, seconds in parts.items()))
    return "\n".join(lines)


def recent_prompt_duty(steps: list[dict], index: int, window_s: float) -> float:
    """The share of the window_s seconds before steps[index] began that steps with prompt tokens
    ran (a GPU that has run chunk after chunk may have lowered its clock)."""
    began = steps[index]["began_s"]
    busy = 0.0
    for step in reversed(steps[:index]):
        if step["ended_s"] <= began - window_s:
            break
        if step["prefill_tokens"]:
            busy += step["ended_s"] - max(step["began_s"], began - window_s)
    return busy / window_s


@dataclass(frozen=True)
class MixedTerms:
    """A least-squares line of mixed steps' thread time over the model's price."""
    num_steps: int
    intercept: float
    per_duty: float          # per unit of prompt duty in the window before the step
    per_ten_seqs: float      # per 10 decoding sequences beside the chunk
    per_100k_context: float  # per 100k context tokens of those sequences
    sd: float
    residual_sd: float
    bands: list[tuple[float, float, int, float, float, float]]  # duty from, to, steps, medians
    per_extra_prompt: float | None = None   # per prompt past the first (logs with prefill_seqs)


def fit_mixed_terms(steps: list[dict], model: PerfModel, step_budget: int | None,
                    window_s: float = 2.0, min_prompt_tokens: int = 1024) -> MixedTerms | None:
    """What a mixed step's time over the model's price goes with: the prompt duty of the window
    before it, its decoding sequences and their context tokens, and, in logs that record
    `prefill_seqs`, the prompts past the first its chunk came from; None under 8 steps. Steps of
    at least min_prompt_tokens prompt tokens only: a short chunk's ratio is mostly the noise of a
    few milliseconds."""
    table = []
    mixed = [i for i, step in enumerate(steps)
             if kind(step) == "mixed" and step["prefill_tokens"] >= min_prompt_tokens]
    with_prompts = bool(mixed) and all("prefill_seqs" in steps[i] for i in mixed)
    for i in mixed:
        step = steps[i]
        priced = model.step_s(step["prefill_tokens"], step["cached_tokens"],
                              step["decode_seqs"], step["context_tokens"], step_budget)
        table.append(((step["ended_s"] - step["began_s"]) / priced,
                      recent_prompt_duty(steps, i, window_s), step["decode_seqs"] / 10,
                      step["context_tokens"] / 1e5)
                     + ((step["prefill_seqs"] - 1,) if with_prompts else ()))
    if len(table) < 8:
        return None
    data = np.array(table)
    terms = np.c_[np.ones(len(data)), data[:, 1:]]
    coef, *_ = np.linalg.lstsq(terms, data[:, 0], rcond=None)
    bands = []
    for low, high in ((0.0, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1.01)):
        band = data[(data[:, 1] >= low) & (data[:, 1] < high)]
        if len(band):
            bands.append((low, min(high, 1.0), len(band), float(np.median(band[:, 0])),
                          float(np.median(band[:, 2])) * 10, float(np.median(band[:, 3])) * 1e5))
    return MixedTerms(len(data), *(float(c) for c in coef[:4]), float(data[:, 0].std()),
                      float((data[:, 0] - terms @ coef).std()), bands,
                      float(coef[4]) if with_prompts else None)


def mixed_terms_text(fit: MixedTerms | None, window_s: float = 2.0) -> str:
    if fit is None:
        return "mixed steps: too few to fit"
    lines = [f"mixed steps: {fit.num_steps}; thread / model = {fit.intercept:.3f} "
             f"{fit.per_duty:+.3f} x prompt duty of the {window_s:g} s before "
             f"{fit.per_ten_seqs:+.4f} x decoding sequences / 10 "
             f"{fit.per_100k_context:+.4f} x their context / 100k "
             + (f"{fit.per_extra_prompt:+.4f} x prompts past the first "
                if fit.per_extra_prompt is not None else "")
             + f"(sd {fit.sd:.3f}, residual sd {fit.residual_sd:.3f})"]
    for low, high, count, ratio, seqs, context in fit.bands:
        lines.append(f"  duty {low:g}-{high:g}: {count} steps, thread / model {ratio:.3f}, "
                     f"decoding sequences {seqs:.0f}, context {context:.0f} (medians)")
    return "\n".join(lines)


def _band_order(name: str) -> int:
    for i, band in enumerate(("1-16", "17-32", "33+", "<50k", "50k-150k", "150k+")):
        if band in name:
            return i
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="step logs (one JSON line per step)")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--step-budget", type=int, default=None,
                        help="the workers' --max-num-batched-tokens (default: the profile's)")
    parser.add_argument("--idle-ms", type=float, default=50.0,
                        help="a gap between steps past this is idle time, not loop work")
    parser.add_argument("--since", type=float, default=0.0,
                        help="only steps logged at or after this epoch time (`at_s`): one case "
                             "of several run against the same server")
    parser.add_argument("--until", type=float, default=float("inf"))
    parser.add_argument("--by-shape", action="store_true",
                        help="decode steps by batch, mixed steps by the decodes' context tokens")
    parser.add_argument("--mixed-terms", action="store_true",
                        help="also fit the time over the model's price of mixed steps (1024+ "
                             "prompt tokens) on the prompt duty before them, their decode batch "
                             "and its context")
    parser.add_argument("--cases", default=None,
                        help="a JSON list of {case, start_s, end_s}: one report per case")
    args = parser.parse_args()
    model = PerfModel.load(args.profile)
    spans = [("", args.since, args.until)]
    if args.cases:
        spans = [(case + ": ", since, until) for case, since, until in case_spans(args.cases)]
    for path, logged in zip(args.logs, load(args.logs)):
        for name, since, until in spans:
            steps = between(logged, since, until)
            print(f"{name}{path}: {len(steps)} steps")
            if steps:
                print(report(steps, model, args.step_budget, args.idle_ms / 1e3,
                             args.by_shape))
                if args.mixed_terms:
                    print(mixed_terms_text(fit_mixed_terms(steps, model, args.step_budget)))


if __name__ == "__main__":
    main()
