"""Mooncake trace replay: prefix structure kept, lengths and times scaled as stated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.bench.trace import TraceConfig, load_trace_dataset, load_trace_rows

REAL_TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "conversation_trace.jsonl"

ROWS = [
    {"timestamp": 1000, "input_length": 1100, "output_length": 300, "hash_ids": [0, 1, 2]},
    {"timestamp": 1000, "input_length": 1500, "output_length": 10, "hash_ids": [0, 1, 3]},
    {"timestamp": 3000, "input_length": 600, "output_length": 1, "hash_ids": [4, 5]},
    {"timestamp": 4500, "input_length": 1024, "output_length": 50, "hash_ids": [0, 1]},
]


@pytest.fixture
def trace_path(tmp_path: Path) -> str:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n\n")
    return str(path)


def test_trace_keeps_prefix_structure_and_scales_lengths(trace_path):
    # 512 trace tokens per hash id replayed as 8 tokens: a length scale of 1/64.
    config = TraceConfig(path=trace_path, block_tokens=8, output_scale=0.1, time_scale=0.5)
    requests = load_trace_dataset(config, seed=7)
    assert [r.prompt_len for r in requests] == [18, 24, 10, 16]  # ceil(len / 64)
    assert [r.output_len for r in requests] == [30, 1, 1, 5]     # round(len * 0.1), at least 1
    assert [r.arrival_offset_s for r in requests] == [0.0, 0.0, 1.0, 1.75]
    a, b, c, d = (r.prompt_token_ids for r in requests)
    # Same hash-id prefix [0, 1] -> same 16-token prefix; then the runs differ.
    assert a[:16] == b[:16] == d
    assert a[16:18] != b[16:18]
    # Hash id 2's run is cut to the 2 tokens the scaled length leaves.
    assert len(a) == 18
    # A request with a different first hash id shares no block.
    assert c[:8] != a[:8]


def test_same_hash_id_gives_same_tokens_across_loads_and_seed_changes_them(trace_path):
    config = TraceConfig(path=trace_path, block_tokens=8)
    assert load_trace_dataset(config, seed=1) == load_trace_dataset(config, seed=1)
    assert load_trace_dataset(config, seed=1) != load_trace_dataset(config, seed=2)


def test_unscaled_trace_keeps_recorded_lengths(trace_path):
    requests = load_trace_dataset(TraceConfig(path=trace_path), seed=0)
    assert [r.prompt_len for r in requests] == [1100, 1500, 600, 1024]
    assert [r.output_len for r in requests] == [300, 10, 1, 50]
    assert requests[0].prompt_token_ids[:1024] == requests[3].prompt_token_ids


def test_num_requests_takes_the_first_rows(trace_path):
    requests = load_trace_dataset(TraceConfig(path=trace_path, num_requests=2, block_tokens=4),
                                  seed=0)
    assert len(requests) == 2


def test_malformed_row_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"timestamp": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_trace_rows(path)


@pytest.mark.skipif(not REAL_TRACE.exists(), reason="shared trace file not present")
def test_real_trace_first_50_rows():
    rows = load_trace_rows(REAL_TRACE, limit=50)
    assert len(rows) == 50
    config = TraceConfig(path=str(REAL_TRACE), num_requests=50, block_tokens=16)
    requests = load_trace_dataset(config, seed=0)
    assert len(requests) == 50
    for row, request in zip(rows, requests):
        assert request.prompt_len == -(-row.input_length * 16 // 512)
        assert request.output_len == row.output_length
        assert request.arrival_offset_s == (row.timestamp_ms - rows[0].timestamp_ms) / 1e3
    # The first 50 rows all start with hash id 0, so they share their first block.
    assert all(row.hash_ids[0] == 0 for row in rows)
    first_blocks = {request.prompt_token_ids[:16] for request in requests}
    assert len(first_blocks) == 1
