"""Errors of the OpenAI-compatible HTTP API, in the shape OpenAI's clients parse.

Every failure answers `{"error": {"message", "type", "param", "code"}}`: clients such as the official
`openai` package read `message` into the exception they raise, so the message is written for the
person who sent the request and names the offending field and value. `type` follows OpenAI's
vocabulary (`invalid_request_error` for 4xx, `server_error` for 5xx); `code` is a short machine-
readable reason where one helps (`server_draining`). A model that is not served is a 404 as vLLM
answers it: type `NotFoundError`, code 404 (clients built for vLLM look for those).

Error bodies are written as ASCII JSON: a message that quotes a client's malformed text (a lone
surrogate, say) must still serialize, or the connection it answers on breaks.

Nothing here lets a traceback reach a client: unexpected exceptions become a 500 with a generic
message that carries the request id, and the traceback goes to the log under that id.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.frontend.request_rules import RequestError
from tandem.frontend.types import RequestRejected

logger = logging.getLogger(__name__)


class OpenAIError(Exception):
    """A request that fails with an OpenAI error object and an HTTP status."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None,
                 code: str | int | None = None, error_type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.error_type = error_type or error_type_for_status(status)
        self.headers = headers or {}

    @classmethod
    def from_request_error(cls, exc: RequestError) -> OpenAIError:
        if exc.status == 404:
            return cls(exc.message, 404, param=exc.param, code=404, error_type="NotFoundError")
        return cls(exc.message, exc.status, param=exc.param, code=exc.code)

    @classmethod
    def from_rejected(cls, exc: RequestRejected) -> OpenAIError:
        error_type = error_type_for_status(exc.status)
        # RequestRejected's default code is itself a type name; repeating it as `code` adds nothing.
        code = None if exc.code == error_type else exc.code
        retry_after_s = getattr(exc, "retry_after_s", None)   # set when the server is overloaded
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        return cls(exc.message, exc.status, code=code, error_type=error_type, headers=headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


def error_type_for_status(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def internal_error(request_id: str) -> OpenAIError:
    return OpenAIError(f"internal server error while serving request {request_id}; "
                       "the server log has the details under that id", 500)


def error_response(error: OpenAIError) -> Response:
    content = json.dumps(error.body(), ensure_ascii=True, allow_nan=False).encode("ascii")
    return Response(content, status_code=error.status, headers=error.headers,
                    media_type="application/json")


def install_error_handlers(app: FastAPI) -> None:
    """Make the errors FastAPI and Starlette raise themselves (unknown route, wrong method) look like
    OpenAI's, and turn anything unexpected into a 500 error object instead of a plain-text page."""

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(OpenAIError(message, exc.status_code))

    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        # The routes parse their bodies themselves; this only guards routes added later.
        return error_response(OpenAIError(f"invalid request: {exc.errors()}", 400))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(OpenAIError("internal server error", 500))

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
