"""Replay of a Mooncake-format request trace (`--dataset trace:PATH`).

Each JSONL row is `{timestamp (ms), input_length, output_length, hash_ids}`, one hash id per
`trace_block_size` (512) tokens of input; equal ids at the same position mean an equal prefix.
The trace holds no text, so each hash id becomes a deterministic run of `block_tokens` token ids,
seeded by the id: the same id always yields the same tokens, which keeps the prefix structure, and
with `block_tokens` equal to the server's KV block size each trace block maps to one cache block.

Scaling, all stated by the caller:
- input: `block_tokens / trace_block_size` tokens per trace token; the prompt is the hash ids'
  token runs joined and cut to `ceil(input_length * scale)`, rounded up so that a prompt reaching
  into its last trace block still shows that block.
- output: `round(output_length * output_scale)`, at least 1.
- time: arrival offsets are `(timestamp - first timestamp) * time_scale`; 0.5 replays twice as fast.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from tandem.bench.block_draws import BlockTokens
from tandem.bench.records import BenchRequest

MOONCAKE_BLOCK_SIZE = 512  # tokens per hash id in the Mooncake traces


@dataclass(frozen=True)
class TraceRow:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class TraceConfig:
    path: str
    num_requests: int | None = None      # None: the whole file
    trace_block_size: int = MOONCAKE_BLOCK_SIZE
    block_tokens: int | None = None      # None: trace_block_size, i.e. lengths as recorded
    output_scale: float = 1.0
    time_scale: float = 1.0
    vocab_size: int = 2000

    def __post_init__(self) -> None:
        if self.num_requests is not None and self.num_requests <= 0:
            raise ValueError(f"--num-requests must be positive, got {self.num_requests}")
        if self.trace_block_size <= 0:
            raise ValueError(f"--trace-block-size must be positive, got {self.trace_block_size}")
        if self.block_tokens is not None and self.block_tokens <= 0:
            raise ValueError(f"--trace-block-tokens must be positive, got {self.block_tokens}")
        if self.output_scale <= 0 or self.time_scale < 0:
            raise ValueError("--output-scale must be positive and --time-scale non-negative")

    @property
    def tokens_per_block(self) -> int:
        return self.block_tokens if self.block_tokens is not None else self.trace_block_size


def load_trace_rows(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    """Read up to `limit` rows of a Mooncake JSONL trace."""
    rows: list[TraceRow] = []
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(_parse_row(line, f"{path}:{line_number}"))
    return rows


def trace_requests(rows: Iterable[TraceRow], config: TraceConfig, seed: int) -> list[BenchRequest]:
    """Turn trace rows into requests, scaled as the module docstring says."""
    rows = list(rows)
    if not rows:
        return []
    # A whole trace is 145M token ids in fresh tuples, which no cycle can involve: left on, the
    # collector walks each new prompt (half the time of this loop on a 12k-request trace).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _build_requests(rows, config, seed)
    finally:
        if was_enabled:
            gc.enable()


def _build_requests(rows: list[TraceRow], config: TraceConfig, seed: int) -> list[BenchRequest]:
    first_ms = rows[0].timestamp_ms
    length_scale = config.tokens_per_block / config.trace_block_size
    blocks = BlockTokens(seed, config.tokens_per_block, config.vocab_size)
    shapes = []
    for row in rows:
        input_len = min(math.ceil(row.input_length * length_scale),
                        len(row.hash_ids) * config.tokens_per_block)
        shapes.append((input_len, -(-input_len // config.tokens_per_block)))
    blocks.prepare(chain.from_iterable(row.hash_ids[:num_blocks]
                                       for row, (_, num_blocks) in zip(rows, shapes)))
    requests = []
    for row, (input_len, num_blocks) in zip(rows, shapes):
        # Block lists joined by C-level extends (a copy of pointers, where iterating a chain
        # handled each of a trace's 145M ids on its own): prompts of 100k tokens.
        prompt: list[int] = []
        for tokens in map(blocks.tokens, row.hash_ids[:num_blocks]):
            prompt += tokens
        del prompt[input_len:]
        requests.append(BenchRequest(
            prompt_token_ids=tuple(prompt),
            output_len=max(1, round(row.output_length * config.output_scale)),
            arrival_offset_s=(row.timestamp_ms - first_ms) / 1e3 * config.time_scale))
    return requests


def load_trace_dataset(config: TraceConfig, seed: int) -> list[BenchRequest]:
    return trace_requests(load_trace_rows(config.path, config.num_requests), config, seed)


def _parse_row(line: str, where: str) -> TraceRow:
    try:
        raw = json.loads(line)
        row = TraceRow(timestamp_ms=float(raw["timestamp"]),
                       input_length=int(raw["input_length"]),
                       output_length=int(raw["output_length"]),
                       hash_ids=tuple(int(h) for h in raw["hash_ids"]))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: not a Mooncake trace row ({err})") from err
    if row.input_length <= 0 or not row.hash_ids or any(h < 0 for h in row.hash_ids):
        raise ValueError(f"{where}: needs a positive input_length and non-negative hash_ids")
    return row
