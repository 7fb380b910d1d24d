"""Turns the timestamps of one streamed response into a `RequestRecord`.

Both clients (OpenAI HTTP and gRPC) feed it the same events: a chunk that carried tokens, the usage
the server reported, and the end of the stream. Keeping this apart from the network code means the
timing rules (what counts as the first token, which gaps are inter-token latencies) are written
once and tested without a server. Times are `time.perf_counter()` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.bench.records import RequestRecord


@dataclass(slots=True)
class StreamRecorder:
    request_index: int
    run_start_s: float
    send_s: float
    fallback_prompt_tokens: int
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    completion_tokens: int | None = None

    def on_tokens(self, now_s: float, num_tokens: int) -> None:
        """A streamed chunk carrying `num_tokens` new tokens arrived at `now_s`."""
        self.chunk_times_s.append(now_s)
        self.chunk_tokens.append(num_tokens)

    def on_usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cached_tokens = cached_tokens

    def finish(self, now_s: float, error: str | None = None) -> RequestRecord:
        if error is None and not self.chunk_times_s:
            error = "stream ended without any token"
        times = self.chunk_times_s
        ttft_ms = (times[0] - self.send_s) * 1e3 if times else None
        itl_ms = tuple((later - earlier) * 1e3 for earlier, later in zip(times, times[1:]))
        # The server's usage count wins: a text chunk may hold several tokens.
        output_tokens = (self.completion_tokens if self.completion_tokens is not None
                         else sum(self.chunk_tokens))
        return RequestRecord(
            request_index=self.request_index,
            start_s=self.send_s - self.run_start_s,
            ttft_ms=ttft_ms,
            itl_ms=itl_ms,
            e2e_ms=(now_s - self.send_s) * 1e3,
            prompt_tokens=(self.prompt_tokens if self.prompt_tokens is not None
                           else self.fallback_prompt_tokens),
            cached_tokens=self.cached_tokens,
            output_tokens=output_tokens,
            chunk_times_s=tuple(t - self.run_start_s for t in times),
            chunk_tokens=tuple(self.chunk_tokens),
            error=error,
        )
