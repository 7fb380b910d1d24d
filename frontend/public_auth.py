"""Who may use the public APIs, and over what: an API key and TLS, as vLLM's `--api-key` and
`--ssl-certfile/--ssl-keyfile` offer.

The threat. Without a key anyone who reaches the HTTP or gRPC port can generate (spend the GPUs,
read the model's answers); without TLS, prompts, answers and the key itself cross the network in
clear text once the frontend binds anything but loopback.

- `api_key` (`--api-key`, better TANDEM_API_KEY: a flag shows in `ps`): every HTTP request must
  send `Authorization: Bearer <key>` and every gRPC call the metadata `authorization: Bearer <key>`,
  or get 401 (in OpenAI's error shape, with `WWW-Authenticate: Bearer`) or UNAUTHENTICATED. Keys
  are compared in constant time. Open without a key, so that load balancers and Prometheus need no
  secret: HTTP `/health` and `/metrics`, and gRPC's standard health service. Everything else on
  the public gRPC server (tandem.v1, KServe, reflection) needs the key.
- `ssl_certfile` and `ssl_keyfile`: both APIs serve TLS only (HTTPS, and a gRPC port that takes
  TLS connections only). Unset, both are plain text, as before.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import grpc

from tandem.worker.auth import RefusalLog, metadata_value, refusing_handler

logger = logging.getLogger(__name__)

OPEN_HTTP_PATHS = frozenset({"/health", "/metrics"})
OPEN_GRPC_SERVICES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True, slots=True)
class AccessConfig:
    api_key: str | None = field(default=None, repr=False)  # None: the public APIs are open
    ssl_certfile: str | None = None  # PEM certificate chain; with ssl_keyfile: TLS only
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (unset it to serve without a key)")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: give both or neither")
        for path in (self.ssl_certfile, self.ssl_keyfile):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"TLS file {path!r} does not exist")

    @property
    def uses_tls(self) -> bool:
        return self.ssl_certfile is not None


def bearer(api_key: str) -> bytes:
    return f"Bearer {api_key}".encode()


# ---- HTTP ----------------------------------------------------------------------------------------

class ApiKeyMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streamed responses)."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = bearer(api_key)
        self.refusals = RefusalLog("HTTP")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_HTTP_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        if given is not None and hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        self.refusals.refused(scope["path"], f"{client[0]}:{client[1]}",
                              "no API key" if given is None else "a wrong API key")
        await _unauthorized(send)


async def _unauthorized(send: Any) -> None:
    body = json.dumps({"error": {
        "message": "missing or incorrect API key: send 'Authorization: Bearer <key>'",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})


def protect_http(app: Any, access: AccessConfig) -> None:
    if access.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=access.api_key)


def uvicorn_tls(access: AccessConfig) -> dict[str, str]:
    """Keyword arguments of uvicorn.Config for TLS (none without it)."""
    if not access.uses_tls:
        return {}
    return {"ssl_certfile": access.ssl_certfile, "ssl_keyfile": access.ssl_keyfile}


# ---- gRPC ----------------------------------------------------------------------------------------

class ApiKeyCheck(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <key>` (health checks excepted)."""

    def __init__(self, api_key: str):
        self.expected = bearer(api_key)
        self.refusals = RefusalLog("public gRPC")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_GRPC_SERVICES):
            return handler
        given = metadata_value(handler_call_details.invocation_metadata, "authorization")
        if given is not None and hmac.compare_digest(given, self.expected):
            return handler
        reason = "no API key" if given is None else "a wrong API key"
        return refusing_handler(handler, method, reason, self.refusals,
                                "send the metadata 'authorization: Bearer <key>'")


def grpc_interceptors(access: AccessConfig) -> list[grpc.aio.ServerInterceptor]:
    return [] if access.api_key is None else [ApiKeyCheck(access.api_key)]


def add_public_port(server: grpc.aio.Server, address: str, access: AccessConfig) -> int:
    """Bind the public gRPC port: TLS only when configured, else plain text."""
    if not access.uses_tls:
        return server.add_insecure_port(address)
    with open(access.ssl_keyfile, "rb") as key, open(access.ssl_certfile, "rb") as cert:
        credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
    return server.add_secure_port(address, credentials)
