"""One access log line per HTTP request, and `X-Request-Id`.

A client's `X-Request-Id` header is kept as the request's client id (one is made when the client
sends none) and returned in the response's `X-Request-Id` header. The pipeline names requests with
ids of its own (two clients may well pick the same id); the access line maps one to the other:

    127.0.0.1:51234 "POST /v1/completions" 200 0.412 s x-request-id=run7-42 requests=cmpl-9f0c...

The pipeline's ids reach the line through a context variable: the request's ASGI task and the
tasks it starts (the response stream) share it, so no API handler has to pass it along.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

logger = logging.getLogger(__name__)

HEADER = b"x-request-id"
MAX_ID_CHARS = 256   # a longer header is cut: it only labels log lines

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
