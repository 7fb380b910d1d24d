"""Streaming client for an OpenAI-compatible `/v1/completions` endpoint, timing every chunk.

The request asks for `stream: true` with `stream_options.include_usage`, so the last event carries
the server's token counts (and `prompt_tokens_details.cached_tokens`), and `ignore_eos` so every
request generates exactly `max_tokens` tokens. The SSE stream is parsed here rather than through
an SDK so that each chunk is timestamped the moment its bytes arrive.

HTTP is aiohttp's, as in vLLM's serving benchmark: its C parser and a read that hands over
whatever bytes arrived make a streamed chunk cost a few microseconds of the client's CPU, where
httpx's line iterator (through httpcore and anyio) cost about 160 us per token and made the client,
not the server, the ceiling of a short-prompt, long-output run on one host. Events are split out of
those bytes here (`SSEEventSplitter`); every event in one read gets that read's arrival time.

A chunk counts as carrying tokens when its choice has text, or has no finish reason (a token
whose text the server's detokenizer is still holding back); a chunk with only a finish reason, or
the usage-only chunk, is not a token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp

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


class SSEEventSplitter:
    """The `data:` payloads of the events in a byte stream fed in arbitrary pieces. An event ends
    at a blank line; lines end with LF, CRLF or CR (the SSE grammar); an event's several data lines
    are joined with LF, and events with no data line give nothing."""

    def __init__(self) -> None:
        self._pending = b""   # the start of an event whose blank line has not arrived

    def feed(self, data: bytes) -> list[str]:
        data = self._pending + data
        held = b""
        if b"\r" in data:
            if data.endswith(b"\r"):   # maybe the first half of a CRLF: wait for the next piece
                data, held = data[:-1], b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = data.split(b"\n\n")
        self._pending = events.pop() + held
        payloads = []
        for event in events:
            if event.startswith(b"data:") and b"\n" not in event:   # the usual one-line event
                payloads.append(event[5:].decode().strip())
                continue
            lines = [parse_sse_data(line) for line in event.decode().split("\n")]
            data_lines = [line for line in lines if line is not None]
            if data_lines:
                payloads.append("\n".join(data_lines))
        return payloads


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
        self.base_url = base_url.rstrip("/")
        self._temperature = temperature
        # timeout_s bounds each wait for bytes (as a read timeout), not the whole stream.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=min(timeout_s, 30.0),
                                              sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """Made on first use: aiohttp wants its session made inside the running loop."""
        if self._session is None:
            # No connection cap (limit=0): a pool limit would queue requests inside the client and
            # show up as server latency. trust_env=False (the default) keeps proxy settings away
            # from loopback benchmarks.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=self._timeout,
                auto_decompress=False)
        return self._session

    async def prepare(self) -> None:
        """Ask the server for its model name when none was given."""
        if self.model is not None:
            return
        try:
            async with self.session.get(self.base_url + "/v1/models") as response:
                response.raise_for_status()
                models = (await response.json(content_type=None)).get("data") or []
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
            raise ConnectionError(f"cannot list models at {self.base_url}: {err!r}") from err
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
            async with self.session.post(self.base_url + self.endpoint, json=body) as response:
                if response.status != 200:
                    text = (await response.read()).decode(errors="replace")[:300]
                    return recorder.finish(time.perf_counter(), f"HTTP {response.status}: {text}")
                await self._read_events(response, recorder)
        except (aiohttp.ClientError, asyncio.TimeoutError, StreamError, ValueError) as err:
            logger.debug("request %d failed: %r", request_index, err)
            return recorder.finish(time.perf_counter(), f"{type(err).__name__}: {err}")
        return recorder.finish(time.perf_counter())

    async def _read_events(self, response: aiohttp.ClientResponse,
                           recorder: StreamRecorder) -> None:
        splitter = SSEEventSplitter()
        async for data in response.content.iter_any():
            now_s = time.perf_counter()
            for payload in splitter.feed(data):
                if payload == SSE_DONE:
                    return
                self._record_chunk(recorder, json.loads(payload), now_s)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

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
