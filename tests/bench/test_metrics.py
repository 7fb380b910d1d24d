"""Summary metrics on hand-made records, the ideal prefix hit rate, and the stream recorder."""

from __future__ import annotations

import pytest

from tandem.bench.metrics import (ideal_prefix_hit_rate, latency_stats, parse_percentiles,
                                  parse_slo, percentile, summarize)
from tandem.bench.records import BenchRequest, RequestRecord
from tandem.bench.stream_recorder import StreamRecorder


def _record(index: int, ttft_ms: float | None, itl_ms: tuple[float, ...], e2e_ms: float,
            output_tokens: int, prompt_tokens: int, cached_tokens: int,
            error: str | None = None) -> RequestRecord:
    return RequestRecord(request_index=index, start_s=0.0, ttft_ms=ttft_ms, itl_ms=itl_ms,
                         e2e_ms=e2e_ms, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                         output_tokens=output_tokens, error=error)


RECORDS = [
    _record(0, 100.0, (10.0, 20.0, 30.0), 160.0, output_tokens=4, prompt_tokens=100,
            cached_tokens=50),
    _record(1, 200.0, (40.0,), 240.0, output_tokens=2, prompt_tokens=100, cached_tokens=0),
    _record(2, 300.0, (), 300.0, output_tokens=1, prompt_tokens=50, cached_tokens=25),
    _record(3, None, (), 5.0, output_tokens=0, prompt_tokens=80, cached_tokens=80,
            error="HTTP 500"),
]


def test_percentile_interpolates_linearly():
    assert percentile([1.0], 99) == 1.0
    assert percentile([10.0, 20.0, 30.0, 40.0], 50) == 25.0
    assert percentile([10.0, 20.0, 30.0, 40.0], 90) == pytest.approx(37.0)
    assert latency_stats([]).p50 is None


def test_summary_on_hand_made_records():
    summary = summarize(RECORDS, duration_s=2.0, slo={})
    assert summary.num_requests == 4 and summary.num_errors == 1
    assert summary.ttft_ms.p50 == 200.0
    assert summary.ttft_ms.p90 == pytest.approx(280.0)
    assert summary.ttft_ms.p99 == pytest.approx(298.0)
    assert summary.ttft_ms.mean == pytest.approx(200.0)
    assert summary.itl_ms.p50 == 25.0  # pooled gaps 10, 20, 30, 40
    assert summary.itl_ms.p99 == pytest.approx(39.7)
    assert summary.itl_ms.mean == 25.0
    # TPOT: (160-100)/3 = 20 and (240-200)/1 = 40; one-token request 2 has none.
    assert (summary.tpot_ms.p50, summary.tpot_ms.mean) == (30.0, 30.0)
    assert summary.tpot_ms.p90 == pytest.approx(38.0)
    assert summary.e2e_ms.p90 == pytest.approx(288.0)
    assert summary.e2e_ms.mean == pytest.approx(700.0 / 3)
    assert summary.request_throughput == 1.5          # 3 successes / 2 s
    assert summary.output_token_throughput == 3.5     # 7 tokens / 2 s
    assert summary.input_token_throughput == 125.0    # 250 prompt tokens / 2 s
    assert (summary.total_input_tokens, summary.total_output_tokens) == (250, 7)
    assert summary.duration_s == 2.0
    assert summary.prefix_hit_rate == pytest.approx(75 / 250)  # the failed request is left out
    assert summary.goodput == summary.request_throughput  # no SLO: every success is good


def test_goodput_applies_every_bound_and_the_worst_itl():
    # Request 0: ttft 100, worst gap 30 -> good. Request 1: worst gap 40 -> bad.
    # Request 2: ttft 300 -> bad. Request 3 failed.
    summary = summarize(RECORDS, 2.0, parse_slo(["ttft_ms=250", "itl_ms=35"]))
    assert summary.goodput == 0.5
    # Request 2 has no gaps, so only its TTFT can fail it.
    assert summarize(RECORDS, 2.0, {"itl_ms": 35.0}).goodput == 1.0
    assert summarize(RECORDS, 2.0, {"tpot_ms": 25.0, "e2e_ms": 300.0}).goodput == 1.0


def test_json_has_the_documented_keys():
    document = summarize(RECORDS, 2.0, {}, ideal_prefix_hit_rate=0.25).to_json_dict()
    assert set(document) == {
        "ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "request_throughput",
        "output_token_throughput", "goodput", "prefix_hit_rate", "ideal_prefix_hit_rate",
        "num_requests", "num_errors", "duration_s", "input_token_throughput",
        "total_input_tokens", "total_output_tokens"}
    assert set(document["ttft_ms"]) == {"p50", "p90", "p99", "mean"}


def test_chosen_percentiles_add_keys_and_keep_the_default_ones():
    chosen = parse_percentiles("50,90,99,99.9,25")
    assert chosen == (50.0, 90.0, 99.0, 99.9, 25.0)
    document = summarize(RECORDS, 2.0, {}, percentiles=chosen).to_json_dict()
    ttft = document["ttft_ms"]
    assert list(ttft) == ["p50", "p90", "p99", "mean", "p99.9", "p25"]
    assert ttft["p99.9"] == pytest.approx(299.8)  # 200 + 100 * (1.998 - 1)
    assert ttft["p25"] == 150.0
    assert document["itl_ms"]["p99.9"] == pytest.approx(39.97)
    # Asking for fewer still reports p50/p90/p99, which --compare and the simulator read.
    assert set(summarize(RECORDS, 2.0, {}, percentiles=(99.0,)).to_json_dict()["e2e_ms"]) == {
        "p50", "p90", "p99", "mean"}
    assert latency_stats([], (99.9,)).to_json_dict()["p99.9"] is None


@pytest.mark.parametrize("bad", ["50,x", "101", "-1", ""])
def test_parse_percentiles_rejects_bad_lists(bad):
    with pytest.raises(ValueError, match="--percentiles"):
        parse_percentiles(bad)


@pytest.mark.parametrize("bad", [["ttft=5"], ["ttft_ms"], ["ttft_ms=fast"]])
def test_parse_slo_rejects_bad_items(bad):
    with pytest.raises(ValueError):
        parse_slo(bad)


def test_ideal_prefix_hit_rate_counts_leading_blocks_seen_before():
    block = 4
    requests = [
        BenchRequest(tuple(range(1, 11)), 1),                  # 10 tokens, nothing seen: 0
        BenchRequest((*range(1, 9), 99, 98, 97), 1),           # first 2 blocks seen: 8
        BenchRequest((1, 2, 3, 4, 50, 51, 52, 53), 1),         # first block seen: 4
        BenchRequest((5, 6, 7, 8), 1),                         # block seen, but not as a prefix
        BenchRequest((1, 2, 3), 1),                            # no full block: 0
    ]
    assert ideal_prefix_hit_rate(requests, block) == pytest.approx(12 / 36)
    assert ideal_prefix_hit_rate([], block) == 0.0


def test_stream_recorder_times_chunks_and_prefers_server_usage():
    recorder = StreamRecorder(request_index=5, run_start_s=9.0, send_s=10.0,
                              fallback_prompt_tokens=40)
    for now_s in (10.1, 10.15, 10.3):
        recorder.on_tokens(now_s, 1)
    recorder.on_usage(prompt_tokens=50, completion_tokens=4, cached_tokens=16)
    record = recorder.finish(10.4)
    assert record.is_ok and record.request_index == 5
    assert record.ttft_ms == pytest.approx(100.0)
    assert record.itl_ms == pytest.approx((50.0, 150.0))
    assert record.e2e_ms == pytest.approx(400.0)
    assert record.start_s == pytest.approx(1.0)
    assert record.chunk_times_s == pytest.approx((1.1, 1.15, 1.3))
    assert (record.prompt_tokens, record.cached_tokens, record.output_tokens) == (50, 16, 4)
    assert record.tpot_ms == pytest.approx(100.0)  # (400 - 100) / 3


def test_stream_recorder_without_tokens_is_an_error():
    record = StreamRecorder(0, 0.0, 1.0, fallback_prompt_tokens=12).finish(2.0)
    assert record.error == "stream ended without any token"
    assert record.prompt_tokens == 12 and record.ttft_ms is None


def test_output_tokens_per_bin_rates_the_short_last_bin_over_its_width():
    from tandem.bench.plot import output_tokens_per_bin
    records = [
        RequestRecord(0, 0.0, 1.0, (1.0,), 5.0, 4, 0, 3, chunk_times_s=(0.2, 0.9, 1.1),
                      chunk_tokens=(1, 1, 1)),
        RequestRecord(1, 0.0, 1.0, (), 5.0, 4, 0, 2, chunk_times_s=(2.2,), chunk_tokens=(2,)),
        RequestRecord(2, 0.0, None, (), 5.0, 4, 0, 0, chunk_times_s=(0.1,), chunk_tokens=(9,),
                      error="failed"),
    ]
    assert output_tokens_per_bin(records, duration_s=2.5) == [2.0, 1.0, 4.0]
