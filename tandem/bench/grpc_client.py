"""Streaming client for tandem's public gRPC API, `tandem.v1.Generation/Generate`.

Each response of the server stream carries the token ids of one step; a response with token ids
is a token chunk (counted by its ids), and the last one carries the usage with `cached_tokens`.
All requests share one channel: gRPC multiplexes the streams over one HTTP/2 connection.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1.generation_pb2_grpc import GenerationStub
from tandem.bench.records import BenchRequest, RequestRecord
from tandem.bench.stream_recorder import StreamRecorder

logger = logging.getLogger(__name__)


def grpc_target(url: str) -> str:
    """`host:port` from a URL that may carry a scheme: http://127.0.0.1:50051 -> 127.0.0.1:50051."""
    for scheme in ("grpc://", "http://"):
        if url.startswith(scheme):
            return url[len(scheme):].rstrip("/")
    return url.rstrip("/")


def generate_request(request: BenchRequest, model: str, temperature: float) -> pb.GenerateRequest:
    sampling = pb.SamplingOptions(max_tokens=request.output_len, ignore_eos=True,
                                  temperature=temperature)
    if request.prompt_text is not None:
        return pb.GenerateRequest(model=model, text=request.prompt_text, sampling=sampling)
    return pb.GenerateRequest(model=model, sampling=sampling,
                              token_ids=pb.TokenIds(ids=list(request.prompt_token_ids)))


class GrpcGenerationClient:
    def __init__(self, url: str, model: str | None, timeout_s: float,
                 temperature: float) -> None:
        self.model = model or ""  # empty: the server's model
        self._timeout_s = timeout_s
        self._temperature = temperature
        self._target = grpc_target(url)
        self._channel = grpc.aio.insecure_channel(self._target)
        self._stub = GenerationStub(self._channel)

    async def prepare(self) -> None:
        """Wait for the connection, so a wrong address fails once rather than per request."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout=min(self._timeout_s, 30))
        except asyncio.TimeoutError as err:
            raise ConnectionError(f"no gRPC server answers at {self._target}") from err

    async def send(self, request: BenchRequest, request_index: int,
                   run_start_s: float) -> RequestRecord:
        message = generate_request(request, self.model, self._temperature)
        recorder = StreamRecorder(request_index=request_index, run_start_s=run_start_s,
                                  send_s=time.perf_counter(),
                                  fallback_prompt_tokens=request.prompt_len)
        try:
            async for response in self._stub.Generate(message, timeout=self._timeout_s):
                now_s = time.perf_counter()
                if response.token_ids:
                    recorder.on_tokens(now_s, len(response.token_ids))
                if response.HasField("usage"):
                    usage = response.usage
                    recorder.on_usage(usage.prompt_tokens, usage.completion_tokens,
                                      usage.cached_tokens)
        except grpc.aio.AioRpcError as err:
            logger.debug("request %d failed: %s", request_index, err.code().name)
            return recorder.finish(time.perf_counter(), f"{err.code().name}: {err.details()}")
        return recorder.finish(time.perf_counter())

    async def close(self) -> None:
        await self._channel.close()
