"""What the benchmark sends and what it measures: `BenchRequest` in, `RequestRecord` out.

A `BenchRequest` is built by a dataset before anything is sent, so a run is fully described by its
list of requests plus an arrival schedule. A `RequestRecord` is what one client call observed; the
metrics module aggregates records and never sees the network.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    """One request to send.

    `session_id`/`turn_index` tie the turns of one conversation together: turn k+1 of a session is
    sent only after turn k finished. `arrival_offset_s` is set by datasets that carry their own
    arrival times (a replayed trace); otherwise the arrival schedule decides when it is sent.
    `prompt_text` is an alternative to token ids for servers that should tokenize themselves.
    """
    prompt_token_ids: tuple[int, ...]
    output_len: int
    arrival_offset_s: float | None = None
    session_id: int | None = None
    turn_index: int = 0
    prompt_text: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class RequestRecord:
    """What one request observed. Times are relative to the start of the run.

    `itl_ms` holds every gap between consecutive streamed chunks that carried tokens;
    `chunk_times_s`/`chunk_tokens` keep each such chunk's arrival and token count for the
    throughput-over-time plot. A failed request has `error` set and its latencies are not used.
    """
    request_index: int
    start_s: float
    ttft_ms: float | None
    itl_ms: tuple[float, ...]
    e2e_ms: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    chunk_times_s: tuple[float, ...] = ()
    chunk_tokens: tuple[int, ...] = ()
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first; undefined with fewer than two tokens."""
        if self.ttft_ms is None or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    def to_json_dict(self) -> dict:
        return {
            "request_index": self.request_index, "start_s": self.start_s,
            "ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms,
            "itl_ms": list(self.itl_ms), "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens, "output_tokens": self.output_tokens,
            "error": self.error,
        }
