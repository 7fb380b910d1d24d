"""Errors of the OpenAI-compatible HTTP API, in the shape OpenAI's clients parse.

Every failure answers `{"error": {"message", "type", "param", "code"}}`: clients such as the official
`openai` package read `message` into the exception they raise, so the message is written for the
person who sent the request and names the offending field and value. `type` follows OpenAI's
vocabulary (`invalid_request_error` for 4xx, `server_error` for 5xx); `code` is a short machine-
readable reason where one helps (`model_not_found`, `server_draining`).

Nothing here lets a traceback reach a client: unexpected exceptions become a 500 with a generic
message that carries the request id, and the traceback goes to the log under that id.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.frontend.types import RequestRejected

logger = logging.getLogger(__name__)


class OpenAIError(Exception):
    """A request that fails with an OpenAI error object and an HTTP status."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None,
                 code: str | None = None, error_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.error_type = error_type or error_type_for_status(status)

    @classmethod
    def from_rejected(cls, exc: RequestRejected) -> OpenAIError:
        error_type = error_type_for_status(exc.status)
        # RequestRejected's default code is itself a type name; repeating it as `code` adds nothing.
        code = None if exc.code == error_type else exc.code
        return cls(exc.message, exc.status, code=code, error_type=error_type)

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


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def install_error_handlers(app: FastAPI) -> None:
    """Make the errors FastAPI and Starlette raise themselves (unknown route, wrong method) look like
    OpenAI's, and turn anything unexpected into a 500 error object instead of a plain-text page."""

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(OpenAIError(message, exc.status_code))

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The routes parse their bodies themselves; this only guards routes added later.
        return error_response(OpenAIError(f"invalid request: {exc.errors()}", 400))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(OpenAIError("internal server error", 500))

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
