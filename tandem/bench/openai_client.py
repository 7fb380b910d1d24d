"""Streaming client for an OpenAI-compatible `/v1/completions` endpoint, timing every chunk.

The request asks for `stream: true` with `stream_options.include_usage`, so the last event carries
the server's token counts (and `prompt_tokens_details.cached_tokens`), and `ignore_eos` so every
request generates exactly `max_tokens` tokens. The SSE stream is parsed here rather than through
an SDK so that each chunk is timestamped the moment its line arrives.

A chunk counts as carrying tokens when its choice has text, or has no finish reason (a token
whose text the server's detokenizer is still holding back); a chunk with only a finish reason, or
the usage-only chunk, is not a token.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx

from tandem.bench.records import BenchRequest, RequestRecord
from tandem.bench.stream_recorder import StreamRecorder

logger = logging.getLogger(__name__)

SSE_DONE = "[DONE]"


class StreamError(RuntimeError):
    """The server reported an error inside the stream."""


def parse_sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line; None for comments, blank lines and other fields."""
    if not line.startswith("data:"):
        return None
    return line[len("data:"):].strip()


def chunk_token_count(chunk: dict[str, Any]) -> int:
    """1 if this completion chunk carries a token (see the module docstring), else 0."""
    if "error" in chunk:
        raise StreamError(str(chunk["error"]))
    choices = chunk.get("choices") or []
    if not choices:
        return 0
    choice = choices[0]
    return 1 if choice.get("text") or choice.get("finish_reason") is None else 0


def chunk_usage(chunk: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prompt, completion, cached) tokens from a chunk's usage, if it has one."""
    usage = chunk.get("usage")
    if not usage:
        return None
    details = usage.get("prompt_tokens_details") or {}
    return (int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
            int(details.get("cached_tokens") or 0))


def completion_body(request: BenchRequest, model: str, temperature: float) -> dict[str, Any]:
    prompt: str | list[int] = (request.prompt_text if request.prompt_text is not None
                               else list(request.prompt_token_ids))
    return {
        "model": model, "prompt": prompt, "max_tokens": request.output_len,
        "temperature": temperature, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }


class OpenAICompletionsClient:
    """`/v1/completions`; `OpenAIChatClient` (openai_chat_client.py) changes only the endpoint,
    the body and how a chunk's tokens are found."""
    endpoint = "/v1/completions"

    def __init__(self, base_url: str, model: str | None, timeout_s: float,
                 temperature: float) -> None:
        self.model = model
        self._temperature = temperature
        # No connection cap: a pool limit would queue requests inside the client and show up as
        # server latency. trust_env=False keeps proxy settings away from loopback benchmarks.
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), trust_env=False,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def prepare(self) -> None:
        """Ask the server for its model name when none was given."""
        if self.model is not None:
            return
        try:
            response = await self._http.get("/v1/models")
            response.raise_for_status()
            models = response.json().get("data") or []
        except (httpx.HTTPError, ValueError) as err:
            raise ConnectionError(f"cannot list models at {self._http.base_url}: {err}") from err
        if not models:
            raise ValueError("the server lists no model at /v1/models; pass --model")
        self.model = str(models[0]["id"])
        logger.info("benchmarking model %s", self.model)

    async def send(self, request: BenchRequest, request_index: int,
                   run_start_s: float) -> RequestRecord:
        body = self.request_body(request)
        recorder = StreamRecorder(request_index=request_index, run_start_s=run_start_s,
                                  send_s=time.perf_counter(),
                                  fallback_prompt_tokens=request.prompt_len)
        try:
            async with self._http.stream("POST", self.endpoint, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")[:300]
                    return recorder.finish(time.perf_counter(),
                                           f"HTTP {response.status_code}: {text}")
                async for line in response.aiter_lines():
                    now_s = time.perf_counter()
                    payload = parse_sse_data(line)
                    if payload is None:
                        continue
                    if payload == SSE_DONE:
                        break
                    self._record_chunk(recorder, json.loads(payload), now_s)
        except (httpx.HTTPError, StreamError, ValueError) as err:
            logger.debug("request %d failed: %r", request_index, err)
            return recorder.finish(time.perf_counter(), f"{type(err).__name__}: {err}")
        return recorder.finish(time.perf_counter())

    async def close(self) -> None:
        await self._http.aclose()

    def request_body(self, request: BenchRequest) -> dict[str, Any]:
        return completion_body(request, self.model or "", self._temperature)

    def chunk_token_count(self, chunk: dict[str, Any]) -> int:
        return chunk_token_count(chunk)

    def _record_chunk(self, recorder: StreamRecorder, chunk: dict[str, Any],
                      now_s: float) -> None:
        num_tokens = self.chunk_token_count(chunk)
        if num_tokens:
            recorder.on_tokens(now_s, num_tokens)
        usage = chunk_usage(chunk)
        if usage is not None:
            recorder.on_usage(*usage)
