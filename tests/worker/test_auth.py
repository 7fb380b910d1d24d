"""The internal secret on real gRPC calls in this process: a server built by `internal_server`
serves unary and streaming calls from `internal_channel`s holding its secret, and refuses callers
without it or with another one with UNAUTHENTICATED, without running the method. The channel
attaches the secret when a call opens, and hands back grpc's own call (no interceptor between the
stream and its reader)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.worker.auth import (METADATA_KEY, SECRET_ENV, ensure_secret, internal_channel,
                                internal_server, process_secret)

SECRET = "s" * 43


class FakeWorker(wgrpc.WorkerServicer):
    def __init__(self):
        self.calls: list[str] = []
        self.metadata: list[tuple[str, str]] = []

    async def GetStats(self, request, context):
        self.calls.append("GetStats")
        self.metadata = [(m.key, m.value) for m in context.invocation_metadata()
                         if not m.key.startswith(("user-agent", "grpc-"))]
        return wpb.WorkerStats(num_running=3)

    async def Generate(self, request, context):
        self.calls.append("Generate")
        for token in (7, 8):
            yield wpb.TokenChunk(token_ids=[token])


async def serve_and_call(call, worker: FakeWorker | None = None) -> tuple[object, list[str]]:
    worker = worker or FakeWorker()
    server = internal_server(SECRET)
    wgrpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await call(f"127.0.0.1:{port}"), worker.calls
    finally:
        await server.stop(0)


async def code_of(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_calls_with_the_secret_are_served():
    async def call(address):
        async with internal_channel(address, SECRET) as channel:
            stub = wgrpc.WorkerStub(channel)
            stats = await stub.GetStats(wpb.StatsRequest(), timeout=5)
            chunks = [c.token_ids[0] async for c in stub.Generate(wpb.WorkerGenerateRequest())]
            return stats.num_running, chunks

    (num_running, chunks), calls = asyncio.run(serve_and_call(call))
    assert (num_running, chunks, calls) == (3, [7, 8], ["GetStats", "Generate"])


@pytest.mark.parametrize("metadata", [None, ((METADATA_KEY, "w" * 43),),
                                      ((METADATA_KEY, SECRET[:-1]),), (("other", SECRET),)])
def test_calls_without_the_secret_are_refused_before_the_method_runs(metadata):
    async def call(address):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = wgrpc.WorkerStub(channel)
            unary = await code_of(stub.GetStats(wpb.StatsRequest(), metadata=metadata, timeout=5))

            async def drain():
                return [c async for c in stub.Generate(wpb.WorkerGenerateRequest(), metadata=metadata)]
            return unary, await code_of(drain())

    codes, calls = asyncio.run(serve_and_call(call))
    assert codes == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED)
    assert calls == []


def test_a_channel_holding_another_secret_is_refused_with_a_clear_message():
    async def call(address):
        async with internal_channel(address, "w" * 43) as channel:
            stub = wgrpc.WorkerStub(channel)
            try:
                await stub.GetStats(wpb.StatsRequest(), timeout=5)
            except grpc.aio.AioRpcError as err:
                unary = (err.code(), err.details())

            async def drain():
                return [c async for c in stub.Generate(wpb.WorkerGenerateRequest())]
            return unary, await code_of(drain())

    (unary, streamed), calls = asyncio.run(serve_and_call(call))
    assert unary == (grpc.StatusCode.UNAUTHENTICATED,
                     "this is an internal tandem API: a wrong secret")
    assert streamed == grpc.StatusCode.UNAUTHENTICATED and calls == []


def test_the_secret_joins_a_calls_own_metadata_once():
    async def call(address):
        async with internal_channel(address, SECRET) as channel:
            stub = wgrpc.WorkerStub(channel)
            await stub.GetStats(wpb.StatsRequest(), metadata=(("x-request-id", "r1"),), timeout=5)

    worker = FakeWorker()
    asyncio.run(serve_and_call(call, worker))
    assert worker.metadata == [("x-request-id", "r1"), (METADATA_KEY, SECRET)]


def test_a_stream_is_grpcs_own_call_read_without_an_interceptor():
    async def call(address):
        async with internal_channel(address, SECRET) as channel:
            stream = wgrpc.WorkerStub(channel).Generate(wpb.WorkerGenerateRequest())
            chunks = [(await stream.read()).token_ids[0], (await stream.read()).token_ids[0]]
            return stream, chunks, await stream.read()

    (stream, chunks, last), _ = asyncio.run(serve_and_call(call))
    # grpc.aio wraps an intercepted stream in InterceptedUnaryStreamCall, a task per call and two
    # async generators per message.
    assert isinstance(stream, grpc.aio.UnaryStreamCall)
    assert "Intercepted" not in type(stream).__name__
    assert chunks == [7, 8] and last is grpc.aio.EOF


def test_the_launcher_keeps_an_operators_secret_and_makes_one_otherwise():
    environ = {SECRET_ENV: SECRET}
    assert ensure_secret(environ) == SECRET
    environ = {}
    made = ensure_secret(environ)
    assert environ[SECRET_ENV] == made and len(made) == 43 and made != ensure_secret({})
    with pytest.raises(ValueError, match="at least 16"):
        ensure_secret({SECRET_ENV: "short"})


def test_no_internal_server_or_channel_without_a_secret(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(RuntimeError, match=SECRET_ENV):
        process_secret()
    with pytest.raises(RuntimeError, match=SECRET_ENV):
        internal_server()
    with pytest.raises(RuntimeError, match=SECRET_ENV):
        internal_channel("127.0.0.1:1")
    with pytest.raises(ValueError, match="at least 16"):
        internal_channel("127.0.0.1:1", "short")
