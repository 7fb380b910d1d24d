"""The summary table and `--compare` of two saved summaries."""

from __future__ import annotations

import json

from tandem.bench.cli import main
from tandem.bench.report import format_errors, format_summary


def _summary(ttft_p50: float, throughput: float, errors: int) -> dict:
    stats = {"p50": ttft_p50, "p90": ttft_p50 * 2, "p99": ttft_p50 * 3, "mean": ttft_p50}
    return {"ttft_ms": stats, "itl_ms": stats, "tpot_ms": stats, "e2e_ms": stats,
            "request_throughput": throughput, "output_token_throughput": throughput * 100,
            "goodput": throughput, "prefix_hit_rate": 0.5, "ideal_prefix_hit_rate": None,
            "num_requests": 10, "num_errors": errors}


def _row(output: str, label: str) -> list[str]:
    line = next(line for line in output.splitlines() if line.startswith(label))
    return line[len(label):].split()


def test_compare_prints_both_values_and_the_ratio(tmp_path, capsys):
    path_a, path_b = tmp_path / "a.json", tmp_path / "b.json"
    path_a.write_text(json.dumps(_summary(ttft_p50=100.0, throughput=4.0, errors=0)))
    path_b.write_text(json.dumps(_summary(ttft_p50=50.0, throughput=5.0, errors=2)))
    assert main(["--compare", str(path_a), str(path_b)]) == 0
    output = capsys.readouterr().out
    assert _row(output, "ttft_ms p50") == ["100.00", "50.00", "0.500"]
    assert _row(output, "request throughput (req/s)") == ["4.00", "5.00", "1.250"]
    assert _row(output, "errors") == ["0", "2", "-"]  # no ratio against zero
    assert _row(output, "ideal prefix hit rate") == ["-", "-", "-"]


def test_summary_table_shows_slo_and_latency_grid():
    table = format_summary(_summary(10.0, 2.0, 0), {"ttft_ms": 500.0, "itl_ms": 50.0})
    assert "goodput (req/s) [ttft_ms<=500, itl_ms<=50]" in table
    assert _row(table, "ttft_ms") == ["10.00", "20.00", "30.00", "10.00"]


def test_table_and_compare_show_duration_input_throughput_and_chosen_percentiles(tmp_path,
                                                                                 capsys):
    summary = _summary(10.0, 2.0, 0) | {"duration_s": 12.5, "input_token_throughput": 800.0}
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        summary[key] = summary[key] | {"p99.9": 40.0}
    table = format_summary(summary)
    assert _row(table, "duration (s)") == ["12.50"]
    assert _row(table, "input throughput (tok/s)") == ["800.00"]
    assert _row(table, "latency") == ["p50", "p90", "p99", "mean", "p99.9"]
    assert _row(table, "ttft_ms") == ["10.00", "20.00", "30.00", "10.00", "40.00"]
    # A summary saved before these keys existed still compares against a new one.
    path_old, path_new = tmp_path / "old.json", tmp_path / "new.json"
    path_old.write_text(json.dumps(_summary(10.0, 2.0, 0)))
    path_new.write_text(json.dumps(summary))
    assert main(["--compare", str(path_old), str(path_new)]) == 0
    output = capsys.readouterr().out
    assert _row(output, "input throughput (tok/s)") == ["-", "800.00", "-"]


def test_format_errors_counts_messages():
    text = format_errors(["HTTP 500", "timeout", "HTTP 500"])
    assert text.splitlines() == ["3 request(s) failed; most common errors:",
                                 "  2 x HTTP 500", "  1 x timeout"]
