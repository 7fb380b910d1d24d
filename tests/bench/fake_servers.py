"""In-process fake servers for the bench end-to-end tests: OpenAI-style SSE over HTTP, and gRPC.

Both stream `max_tokens` tokens with a short sleep between them and report usage at the end. Both
model an infinite prefix cache with tandem's block hashes, so the cached tokens they report are
what `ideal_prefix_hit_rate` predicts for requests served one at a time. Each runs its own event
loop in a daemon thread, so the benchmark under test can own the main thread's loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import grpc

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pb_grpc
from tandem.contracts.block_hash import hash_prompt_blocks

BLOCK_SIZE = 16
MODEL_NAME = "fake-model"
CHAT_TEMPLATE_TOKENS = 3  # what the fake chat endpoint adds to a prompt's word count


@dataclass
class ServedRequest:
    prompt: list[int] | str
    max_tokens: int
    received_s: float
    body: dict = field(default_factory=dict)
    finished_s: float | None = None


class PrefixCache:
    """Infinite cache: counts a prompt's leading full blocks seen before, then stores them."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def lookup_and_store(self, prompt: list[int] | str) -> int:
        if isinstance(prompt, str):
            return 0
        hashes = hash_prompt_blocks(prompt, BLOCK_SIZE)
        hits = 0
        while hits < len(hashes) and hashes[hits] in self._seen:
            hits += 1
        self._seen.update(hashes)
        return hits * BLOCK_SIZE


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coroutine, timeout_s: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class FakeOpenAIServer:
    """Just enough HTTP/1.1 for `GET /v1/models` and streaming `POST /v1/completions`."""

    def __init__(self, token_gap_s: float = 0.002, fail_every: int = 0) -> None:
        self.token_gap_s = token_gap_s
        self.fail_every = fail_every  # every n-th completion request answers 500 (0: never)
        self.served: list[ServedRequest] = []
        self._cache = PrefixCache()
        self._thread = _LoopThread()
        self._server = self._thread.call(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.close()
        self._thread.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            request_line, *header_lines = head.split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in header_lines if line)}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            if method == "GET" and path == "/v1/models":
                await self._send_json(writer, 200, {"data": [{"id": MODEL_NAME}]})
            elif method == "POST" and path == "/v1/completions":
                await self._complete(writer, json.loads(body))
            elif method == "POST" and path == "/v1/chat/completions":
                await self._chat(writer, json.loads(body))
            else:
                await self._send_json(writer, 404, {"error": "not found"})
        finally:
            writer.close()

    async def _complete(self, writer: asyncio.StreamWriter, body: dict) -> None:
        served = ServedRequest(prompt=body["prompt"], max_tokens=body["max_tokens"],
                               received_s=time.perf_counter(), body=body)
        self.served.append(served)
        if self.fail_every and len(self.served) % self.fail_every == 0:
            await self._send_json(writer, 500, {"error": "injected failure"})
            return
        cached = self._cache.lookup_and_store(served.prompt)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for i in range(served.max_tokens):
            await asyncio.sleep(self.token_gap_s)
            last = i == served.max_tokens - 1
            await self._send_event(writer, {"choices": [
                {"index": 0, "text": f" t{i}", "finish_reason": "length" if last else None}]})
        prompt_tokens = len(served.prompt) if isinstance(served.prompt, list) else 7
        await self._send_event(writer, {"choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": served.max_tokens,
            "total_tokens": prompt_tokens + served.max_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}})
        served.finished_s = time.perf_counter()
        await self._send_chunk(writer, b"data: [DONE]\n\n")
        await self._send_chunk(writer, b"")

    async def _chat(self, writer: asyncio.StreamWriter, body: dict) -> None:
        """OpenAI's chat stream: the role alone first, then one content delta per token."""
        prompt = body["messages"][-1]["content"]
        served = ServedRequest(prompt=prompt, max_tokens=body["max_completion_tokens"],
                               received_s=time.perf_counter(), body=body)
        self.served.append(served)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        await self._send_event(writer, {"choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for i in range(served.max_tokens):
            await asyncio.sleep(self.token_gap_s)
            last = i == served.max_tokens - 1
            await self._send_event(writer, {"choices": [{"index": 0, "delta": {
                "content": f" t{i}"}, "finish_reason": "length" if last else None}]})
        prompt_tokens = len(prompt.split()) + CHAT_TEMPLATE_TOKENS
        await self._send_event(writer, {"choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": served.max_tokens,
            "total_tokens": prompt_tokens + served.max_tokens}})
        served.finished_s = time.perf_counter()
        await self._send_chunk(writer, b"data: [DONE]\n\n")
        await self._send_chunk(writer, b"")

    async def _send_event(self, writer: asyncio.StreamWriter, payload: dict) -> None:
        await self._send_chunk(writer, f"data: {json.dumps(payload)}\n\n".encode())

    @staticmethod
    async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    @staticmethod
    async def _send_json(writer: asyncio.StreamWriter, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        await writer.drain()


class _Generation(pb_grpc.GenerationServicer):
    def __init__(self, owner: FakeGrpcServer) -> None:
        self._owner = owner

    async def Generate(self, request, context):
        prompt = list(request.token_ids.ids) if request.HasField("token_ids") else request.text
        served = ServedRequest(prompt=prompt, max_tokens=request.sampling.max_tokens,
                               received_s=time.perf_counter())
        self._owner.served.append(served)
        cached = self._owner.cache.lookup_and_store(prompt)
        for i in range(served.max_tokens):
            await asyncio.sleep(self._owner.token_gap_s)
            yield pb.GenerateResponse(token_ids=[100 + i], text=f" t{i}")
        served.finished_s = time.perf_counter()
        yield pb.GenerateResponse(finish_reason="length", usage=pb.Usage(
            prompt_tokens=len(prompt), completion_tokens=served.max_tokens,
            cached_tokens=cached))


class FakeGrpcServer:
    def __init__(self, token_gap_s: float = 0.002) -> None:
        self.token_gap_s = token_gap_s
        self.served: list[ServedRequest] = []
        self.cache = PrefixCache()
        self._thread = _LoopThread()
        self.port = self._thread.call(self._start())
        self.url = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(_Generation(self), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def close(self) -> None:
        self._thread.call(self._server.stop(grace=None))
        self._thread.stop()
