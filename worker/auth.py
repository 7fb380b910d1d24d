"""Authentication between tandem's own processes: the frontend and its workers.

The threat. The internal gRPC APIs listen on TCP ports that `ss` and `ps` show to every local user
(and, on a cluster, to every host that reaches them): the frontend's Control service, where
workers register, and each worker's Worker service (Generate, Prefill, Release, GetTransferInfo,
ExpectPull, GetKVSnapshot, ...). Unchecked, any process could register as a decode worker and be
sent users' prompts (seen in issue 13), free another request's pinned blocks, read what is cached,
or generate directly, past the public API's key and limits.

The measure. One secret per deployment: 256 random bits from `secrets.token_urlsafe(32)`, made by
`tandem serve` (or taken from TANDEM_INTERNAL_SECRET when the operator sets one, e.g. for tools or
tests that call workers themselves). It is never on a command line: the frontend's process keeps
it in its environment variable TANDEM_INTERNAL_SECRET, and each worker gets it inside its spec
(`WorkerOptions.internal_secret`), which travels in the environment to a local worker process and
as the actor's argument to a Ray actor. `/proc/<pid>/environ` is readable only by the same user,
who could read the process's memory anyway. Every internal channel (`internal_channel`) sends the
secret as gRPC metadata on each call, attached when the call is opened; every internal server
(`internal_server`) compares it in constant time once, when a call starts, and answers anything
else with UNAUTHENTICATED, logged with the caller's address. Both refuse to start without a secret:
an internal server never runs open.

Why the channel attaches the metadata itself rather than through a client interceptor: grpc.aio
runs an intercepted call in a task of its own and hands each streamed message through two more
async generators, on every token of every stream the frontend reads (about 0.5 us of the 15 us a
read of one streamed message cost the reading thread on loopback). `InternalChannel` adds the
metadata as the call opens and returns grpc's own call object.

Why a shared secret and not mutual TLS: against this threat (a process that can reach the port but
was not started by the launcher) a bearer secret is as strong, needs no certificate authority, no
key files to place on every Ray node and no rotation tooling, and costs one comparison per call.
What it does not do is encrypt: tandem binds 127.0.0.1 by default, where other users cannot read
the traffic; a cluster whose network between nodes is not trusted needs mTLS on these channels
(`grpc.ssl_channel_credentials` with client certificates) on top.

The secret belongs to the process, as a TLS certificate would: it is read once from the
environment, and every channel and server of the process uses it, instead of being threaded
through each constructor that happens to open a worker channel.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from tandem.worker.keepalive import CHANNEL_OPTIONS, SERVER_OPTIONS

logger = logging.getLogger(__name__)

SECRET_ENV = "TANDEM_INTERNAL_SECRET"
METADATA_KEY = "tandem-internal-secret"  # gRPC metadata keys are lowercase
MIN_SECRET_CHARS = 16                    # an operator's secret shorter than this is guessable
REFUSAL_LOG_INTERVAL_S = 1.0             # one warning a second at most: a scan must not flood logs


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def ensure_secret(environ: dict[str, str] | None = None) -> str:
    """The deployment's secret: the operator's TANDEM_INTERNAL_SECRET, else a new one put there,
    so that the workers this process starts inherit it."""
    environ = os.environ if environ is None else environ
    secret = environ.get(SECRET_ENV) or new_secret()
    _check(secret)
    environ[SECRET_ENV] = secret
    return secret


def adopt_secret(secret: str) -> None:
    """Take the secret a worker's spec carried (a Ray actor inherits no environment from the
    launcher); "" keeps the process's own TANDEM_INTERNAL_SECRET."""
    if secret:
        _check(secret)
        os.environ[SECRET_ENV] = secret


def process_secret() -> str:
    """The secret this process authenticates with; raises if it was started without one."""
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise RuntimeError(f"{SECRET_ENV} is not set: tandem's workers are started by `tandem "
                           "serve`, which generates the deployment's secret")
    _check(secret)
    return secret


def internal_channel(address: str, secret: str | None = None) -> InternalChannel:
    """An insecure channel (loopback or a trusted network) whose every call carries the secret,
    with keepalive pings that find a peer that is gone (worker/keepalive.py)."""
    secret = secret or process_secret()
    _check(secret)
    return InternalChannel(grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS)),
                           secret)


def internal_server(secret: str | None = None, **kwargs: Any) -> grpc.aio.Server:
    """A grpc.aio server that serves only callers holding the secret and accepts their keepalive
    pings."""
    interceptor = SecretCheck(secret or process_secret())
    options = [*SERVER_OPTIONS, *kwargs.pop("options", [])]
    return grpc.aio.server(interceptors=[interceptor, *kwargs.pop("interceptors", [])],
                           options=options, **kwargs)


def _check(secret: str) -> None:
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"{SECRET_ENV} must be at least {MIN_SECRET_CHARS} characters "
                         f"(`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")


# ---- client side: the metadata on every call ----------------------------------------------------

class InternalChannel:
    """A grpc.aio channel whose calls all carry the secret: a stub built on it (WorkerStub(channel))
    gets multi-callables that add it to the call's metadata when the call is opened; `channel`
    is the grpc channel underneath, for its state."""

    def __init__(self, channel: grpc.aio.Channel, secret: str):
        self.channel = channel
        self._metadata = ((METADATA_KEY, secret),)

    def unary_unary(self, method: str, **kwargs: Any) -> _WithSecret:
        return _WithSecret(self.channel.unary_unary(method, **kwargs), self._metadata)

    def unary_stream(self, method: str, **kwargs: Any) -> _WithSecret:
        return _WithSecret(self.channel.unary_stream(method, **kwargs), self._metadata)

    def stream_unary(self, method: str, **kwargs: Any) -> _WithSecret:
        return _WithSecret(self.channel.stream_unary(method, **kwargs), self._metadata)

    def stream_stream(self, method: str, **kwargs: Any) -> _WithSecret:
        return _WithSecret(self.channel.stream_stream(method, **kwargs), self._metadata)

    async def __aenter__(self) -> InternalChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace)


class _WithSecret:
    """One method's multi-callable; a call's own metadata (if any) goes first."""

    __slots__ = ("_multicallable", "_metadata")

    def __init__(self, multicallable: Any, metadata: tuple[tuple[str, str], ...]):
        self._multicallable = multicallable
        self._metadata = metadata

    def __call__(self, request: Any = None, *, metadata: Any = None, **kwargs: Any) -> Any:
        metadata = self._metadata if not metadata else (*tuple(metadata), *self._metadata)
        return self._multicallable(request, metadata=metadata, **kwargs)


# ---- server side: check it ---------------------------------------------------------------------

class SecretCheck(grpc.aio.ServerInterceptor):
    """Passes calls whose metadata carries the secret; refuses the rest with UNAUTHENTICATED."""

    def __init__(self, secret: str):
        _check(secret)
        self._expected = secret.encode()
        self._refusals = RefusalLog("internal")

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        given = metadata_value(handler_call_details.invocation_metadata, METADATA_KEY)
        if handler is None or (given is not None and hmac.compare_digest(given, self._expected)):
            return handler
        reason = "no secret" if given is None else "a wrong secret"
        return refusing_handler(handler, handler_call_details.method, reason, self._refusals,
                                "this is an internal tandem API")


def metadata_value(metadata: Any, key: str) -> bytes | None:
    """The value of `key` in gRPC invocation metadata, as bytes (None when absent)."""
    for item_key, value in metadata or ():
        if item_key == key:
            return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return None


class RefusalLog:
    """Logs refused calls at most once per REFUSAL_LOG_INTERVAL_S, counting the ones in between."""

    def __init__(self, what: str):
        self.what = what
        self.last_s = float("-inf")
        self.suppressed = 0

    def refused(self, method: str, peer: str, reason: str) -> None:
        now_s = time.monotonic()
        if now_s - self.last_s < REFUSAL_LOG_INTERVAL_S:
            self.suppressed += 1
            return
        logger.warning("refused %s call %s from %s: %s (%d more refused since the last report)",
                       self.what, method, peer, reason, self.suppressed)
        self.last_s, self.suppressed = now_s, 0


def refusing_handler(handler: grpc.RpcMethodHandler, method: str, reason: str, log: RefusalLog,
                     message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED. The request is
    never deserialized: a caller without credentials gets no parser to aim at."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        log.refused(method, context.peer(), reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{message}: {reason}")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
