"""Text tables for a run summary and for two saved summaries side by side; no I/O.

Both work on the summary's JSON form (`Summary.to_json_dict()` or a file written with `--out`),
so a table printed after a run and one printed by `--compare` read the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

LATENCY_KEYS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms")
STAT_KEYS = ("p50", "p90", "p99", "mean")
SCALAR_ROWS = (  # (JSON key, label)
    ("num_requests", "requests"),
    ("num_errors", "errors"),
    ("duration_s", "duration (s)"),
    ("request_throughput", "request throughput (req/s)"),
    ("input_token_throughput", "input throughput (tok/s)"),
    ("output_token_throughput", "output throughput (tok/s)"),
    ("goodput", "goodput (req/s)"),
    ("prefix_hit_rate", "prefix hit rate"),
    ("ideal_prefix_hit_rate", "ideal prefix hit rate"),
)


def stat_keys(summary: Mapping) -> list[str]:
    """p50, p90, p99, mean, then the chosen percentiles the summary holds ("p99.9"), in order."""
    extra = [key for key in (summary.get("ttft_ms") or {}) if key not in STAT_KEYS]
    return [*STAT_KEYS, *extra]


def summary_rows(summary: Mapping) -> list[tuple[str, float | None]]:
    """(label, value) for every metric, scalars first, then each latency statistic."""
    rows: list[tuple[str, float | None]] = [
        (label, summary.get(key)) for key, label in SCALAR_ROWS]
    for key in LATENCY_KEYS:
        stats = summary.get(key) or {}
        rows.extend((f"{key} {stat}", stats.get(stat)) for stat in stat_keys(summary))
    return rows


def format_summary(summary: Mapping, slo: Mapping[str, float] | None = None) -> str:
    """Scalars one per line, then one row per latency metric with its statistics as columns."""
    scalars = [(label, summary.get(key)) for key, label in SCALAR_ROWS]
    if slo:
        bounds = ", ".join(f"{name}<={bound:g}" for name, bound in slo.items())
        scalars = [(f"{label} [{bounds}]" if label.startswith("goodput") else label, value)
                   for label, value in scalars]
    label_width = max(len(label) for label, _ in scalars)
    lines = [f"{label:<{label_width}}  {_format_value(value):>12}" for label, value in scalars]
    lines.append("")
    stats_shown = stat_keys(summary)
    lines.append(f"{'latency':<8}" + "".join(f"{stat:>12}" for stat in stats_shown))
    for key in LATENCY_KEYS:
        stats = summary.get(key) or {}
        lines.append(f"{key:<8}" + "".join(f"{_format_value(stats.get(stat)):>12}"
                                           for stat in stats_shown))
    rule = "=" * max(len(line) for line in lines)
    return "\n".join([rule, "tandem bench".center(len(rule)), rule, *lines, rule])


def format_errors(errors: Sequence[str], limit: int = 3) -> str:
    """The most common error messages with their counts, for a run where requests failed."""
    counts = Counter(errors).most_common(limit)
    lines = [f"{len(errors)} request(s) failed; most common errors:"]
    lines.extend(f"  {count} x {message}" for message, count in counts)
    return "\n".join(lines)


def format_comparison(a: Mapping, b: Mapping, name_a: str = "A", name_b: str = "B") -> str:
    """Every metric of two summaries side by side, with the ratio B/A."""
    rows_a = summary_rows(a)
    rows_b = dict(summary_rows(b))
    width = max(len(label) for label, _ in rows_a)
    header = f"{'metric':<{width}}  {name_a[-14:]:>14}  {name_b[-14:]:>14}  {'B/A':>8}"
    lines = [header, "-" * len(header)]
    for label, value_a in rows_a:
        value_b = rows_b.get(label)
        lines.append(f"{label:<{width}}  {_format_value(value_a):>14}  "
                     f"{_format_value(value_b):>14}  {_format_ratio(value_a, value_b):>8}")
    return "\n".join(lines)


def _format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"


def _format_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.3f}"
