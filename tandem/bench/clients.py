"""The interface the runner drives, and the factory that picks a backend (`--backend`).

A client sends one `BenchRequest`, streams the answer and returns the `RequestRecord` it timed; it
never raises for a failed request, it records the error instead, so one bad request cannot stop
a run.
"""

from __future__ import annotations

from typing import Protocol

from tandem.bench.records import BenchRequest, RequestRecord

BACKENDS = ("openai", "openai-chat", "grpc")
DEFAULT_URLS = {"openai": "http://127.0.0.1:8000", "openai-chat": "http://127.0.0.1:8000",
                "grpc": "127.0.0.1:50051"}


class BenchClient(Protocol):
    async def prepare(self) -> None:
        """Check the server is there (and learn its model name) before the clock starts."""

    async def send(self, request: BenchRequest, request_index: int,
                   run_start_s: float) -> RequestRecord:
        """Send one request and time its stream; `run_start_s` is the run's perf_counter origin."""

    async def close(self) -> None:
        """Release connections."""


def make_client(backend: str, url: str | None, model: str | None, timeout_s: float,
                temperature: float) -> BenchClient:
    """The client for `backend`; imports lazily so that one backend's packages suffice."""
    url = url or DEFAULT_URLS.get(backend, "")
    if backend == "openai":
        from tandem.bench.openai_client import OpenAICompletionsClient
        return OpenAICompletionsClient(url, model, timeout_s, temperature)
    if backend == "openai-chat":
        from tandem.bench.openai_chat_client import OpenAIChatClient
        return OpenAIChatClient(url, model, timeout_s, temperature)
    if backend == "grpc":
        from tandem.bench.grpc_client import GrpcGenerationClient
        return GrpcGenerationClient(url, model, timeout_s, temperature)
    raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
