"""One access log line per HTTP request and per public gRPC call, and `X-Request-Id`.

A client's `X-Request-Id` header (HTTP) or `x-request-id` metadata (gRPC: tandem.v1 and KServe) is
kept as the request's client id (one is made when the client sends none) and returned: in the
response's `X-Request-Id` header, or in the call's initial metadata. The pipeline names requests
with ids of its own (two clients may well pick the same id); the access line maps one to the other:

    127.0.0.1:51234 "POST /v1/completions" 200 0.412 s x-request-id=run7-42 requests=cmpl-9f0c...
    ipv4:127.0.0.1:51240 "gRPC /tandem.v1.Generation/Generate" OK 0.398 s x-request-id=run7-43 requests=grpc-77a1...

The pipeline's ids reach the line through a context variable: the request's ASGI task (or the
gRPC call's task) and the tasks it starts (the response stream, a KServe stream's requests) share
it, so no API handler has to pass it along. The gRPC health service and reflection are not logged:
load balancers poll them.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

import grpc

logger = logging.getLogger(__name__)

HEADER = b"x-request-id"
METADATA_KEY = "x-request-id"
MAX_ID_CHARS = 256   # a longer header is cut: it only labels log lines
LOGGED_GRPC_SERVICES = ("/tandem.v1.Generation/", "/inference.GRPCInferenceService/")

_request_ids: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "tandem_request_ids", default=None)


def note_request_id(request_id: str) -> None:
    """Name a pipeline request on the current HTTP request's access line (if there is one)."""
    ids = _request_ids.get()
    if ids is not None:
        ids.append(request_id)


class AccessLogMiddleware:
    """ASGI middleware: `app.add_middleware(AccessLogMiddleware)`."""

    def __init__(self, app: Callable[..., Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = _client_id(scope)
        ids: list[str] = []
        token = _request_ids.set(ids)
        status = 500   # unless the app starts a response
        started_s = time.perf_counter()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (HEADER, client_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_ids.reset(token)
            client = scope.get("client") or ("-", 0)
            logger.info('%s:%s "%s %s" %d %.3f s x-request-id=%s requests=%s', client[0],
                        client[1], scope["method"], scope["path"], status,
                        time.perf_counter() - started_s, client_id, ",".join(ids) or "-")


def _client_id(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", ()):
        if name == HEADER and value:
            return value.decode("latin-1")[:MAX_ID_CHARS]
    return uuid.uuid4().hex


class GrpcRequestIdInterceptor(grpc.aio.ServerInterceptor):
    """`x-request-id` on the public gRPC services: echoed in the initial metadata, and an access
    line per call. Put it first among the server's interceptors, so that calls another one
    refuses (a wrong API key) carry the id and are logged too."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(LOGGED_GRPC_SERVICES):
            return handler
        client_id = _metadata_id(handler_call_details.invocation_metadata)
        wrap = _wrap_streaming if handler.response_streaming else _wrap_unary
        behavior = _behavior(handler)
        return _same_shape(handler, wrap(behavior, method, client_id))


def _wrap_unary(behavior, method: str, client_id: str):
    async def call(request_or_iterator, context):
        async with _CallLog(context, method, client_id):
            return await behavior(request_or_iterator, context)
    return call


def _wrap_streaming(behavior, method: str, client_id: str):
    async def call(request_or_iterator, context):
        async with _CallLog(context, method, client_id):
            responses = behavior(request_or_iterator, context)
            if not inspect.isasyncgen(responses):
                # A coroutine that writes with context.write, or aborts (an API key refusal).
                await responses
                return
            async for response in responses:
                yield response
    return call


class _CallLog:
    """Around one gRPC call: the id in its initial metadata, the pipeline's ids collected while
    it runs, and the access line once it ends, however it ends."""

    def __init__(self, context: grpc.aio.ServicerContext, method: str, client_id: str):
        self.context = context
        self.method = method
        self.client_id = client_id
        self.ids: list[str] = []
        self.started_s = time.perf_counter()
        # Read while the call is live: peer() on a call the client has cancelled reads the
        # freed C call and crashes the process.
        self.peer = context.peer()

    async def __aenter__(self) -> _CallLog:
        # Not reset on the way out: each call runs in a task of its own, whose context ends with
        # it (and a streaming call may be closed from another context, where a reset would fail).
        _request_ids.set(self.ids)
        await self.context.send_initial_metadata(((METADATA_KEY, self.client_id),))
        return self

    async def __aexit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None:
            code = self._code("OK")
        elif issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
            code = "CANCELLED"
        else:
            code = self._code("UNKNOWN")
        logger.info('%s "gRPC %s" %s %.3f s x-request-id=%s requests=%s', self.peer,
                    self.method, code, time.perf_counter() - self.started_s, self.client_id,
                    ",".join(self.ids) or "-")
        return False

    def _code(self, default: str) -> str:
        code = self.context.code()
        return code.name if isinstance(code, grpc.StatusCode) else default


def _metadata_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == METADATA_KEY and value:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            return text[:MAX_ID_CHARS]
    return uuid.uuid4().hex


def _behavior(handler: grpc.RpcMethodHandler):
    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, name)
        if behavior is not None:
            return behavior
    raise ValueError("a gRPC method handler without a behavior")


def _same_shape(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    """A handler like `handler` (streaming, (de)serializers) that runs `behavior`."""
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}
    return make[(handler.request_streaming, handler.response_streaming)](
        behavior, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
