"""Server-sent events, and abandoning a request as soon as its HTTP client goes away.

A client that disconnects must cancel its request everywhere it lives (DESIGN.md, step 6), which
here means: stop iterating the pipeline's generator and close it, so the pipeline aborts the request
and frees its blocks. Starlette's own streaming response only notices a disconnect on some servers
and never closes the body iterator itself, so tandem watches the connection on its own:

- `SSEResponse` streams its body while listening for `http.disconnect`; on a disconnect it cancels
  the stream, and in every case it ends by closing the body iterator (whose `finally` closes the
  pipeline's generator).
- `run_unless_disconnected` does the same for the waits that happen before a response starts (a
  whole non-streamed generation, or the first chunk of a stream) and raises `ClientDisconnected`.

Cancellation is plain asyncio (one CancelledError), not an anyio cancel scope, so a pipeline may
still await its own clean-up (an abort RPC to a worker) in a `finally` after being cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was complete."""


# One encoder for every event: json.dumps with options builds a new encoder on each call.
encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def sse_event(payload: dict) -> bytes:
    return b"data: " + encode_json(payload).encode("utf-8") + b"\n\n"


class TextEventTemplate:
    """The SSE event of one streamed chunk whose only varying field is its text, made by pasting
    the JSON string of the text between the bytes that `make_body(text)` puts around it. The
    bytes are those `sse_event(make_body(text))` gives, without building and encoding the body."""

    _MARKER = "\x00tandem-text\x00"   # a string no id or model name holds

    def __init__(self, prefix: bytes, suffix: bytes):
        self.prefix = prefix
        self.suffix = suffix

    @classmethod
    def of(cls, make_body) -> TextEventTemplate | None:
        """The template of `make_body`, a function of the text; None if its body holds the text
        anywhere but once."""
        parts = sse_event(make_body(cls._MARKER)).split(encode_json(cls._MARKER).encode("utf-8"))
        if len(parts) != 2:
            return None
        return cls(*parts)

    def event(self, text: str) -> bytes:
        return self.prefix + encode_json(text).encode("utf-8") + self.suffix


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects; the request body must already have been read."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_unless_disconnected(receive: Receive, awaitable: Awaitable[T]) -> T:
    """The result of `awaitable`, or ClientDisconnected (after cancelling it) if the client leaves first."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise ClientDisconnected()
    finally:
        await _cancel(watcher)
        await _cancel(work)


async def close_iterator(iterator: AsyncIterator[Any]) -> None:
    """Close an async iterator early, if it can be; errors from its clean-up are logged, not raised."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("error while closing a response stream")


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that stops, and closes its body iterator, on a disconnect."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]):
        # no-cache and no proxy buffering: each event must reach the client as it is produced.
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if stream.done() and not stream.cancelled():
                error = stream.exception()
                # Servers on ASGI 2.4 report a write to a closed connection as OSError.
                if error is not None and not isinstance(error, OSError):
                    raise error
        finally:
            await _cancel(watcher)
            await _cancel(stream)
            await close_iterator(self.body_iterator)


async def _cancel(task: asyncio.Future) -> None:
    """Cancel `task` and wait for it to finish, without swallowing a cancellation of our own task."""
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()   # retrieved here, so asyncio does not log it as never retrieved
