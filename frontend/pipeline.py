"""The per-request pipeline of the frontend: route, prefill, decode, detokenize, stream.

A request is routed to a decode worker and, when the policy says so, first to a prefill worker,
whose answer (the first token and a KV handle) is streamed to the client at once and then handed to
the decode worker, which pulls the KV and continues. Text is made here, incrementally, and stop
strings are matched here: a match cancels the worker call, which aborts the request there.
Closing the stream (a client that went away) cancels whatever worker call is in flight.

A worker that fails the request (frontend/worker_calls.py: an error, a deadline, or a worker that
dropped out of the registry) makes the request migrate (router/migration.py): the router's books
drop the abandoned route, a worker that is gone leaves the registry at once, and the request is
routed again with the tokens already streamed in its prompt, so the client's stream continues. The
prefill worker's pinned blocks are released here whenever no decode worker took them over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import Histogram

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.contracts.block_hash import hash_prompt_blocks
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.model_info import ModelInfo
from tandem.engine.stop_rule import finish_after_token, stop_reason_of
from tandem.frontend.metrics import FrontendMetrics
from tandem.frontend.types import GenerateChunk, GenerateRequest, RequestRejected
from tandem.frontend.worker_calls import WorkerCallFailed, WorkerCalls
from tandem.router.migration import (MigrationConfig, attempt_request_id, continuation,
                                     decide_migration)
from tandem.router.routing import RouteDecision, Router
from tandem.router.worker_registry import WorkerRegistry, WorkerState
from tandem.contracts.wire import logprob_from_proto, sampling_to_proto
from tandem.worker.clients import CallDeadlines, WorkerClients

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Progress:
    """One request's stream state: detokenizer, counts and timing."""
    detokenizer: IncrementalDetokenizer
    num_prompt_tokens: int
    started_s: float
    decode_worker: str
    request_id: str
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    last_token_s: float | None = None
    first_token_s: float | None = None
    first_worker: tuple[str, str] | None = None  # (worker, role) that produced the first token
    queue_s: float | None = None        # on the first token's worker, arrival to first scheduled
    token_ids: list[int] | None = None  # streamed so far, across migrations
    attempt_has_token: bool = False     # the current attempt produced a token
    itl: Histogram | None = None        # the decode worker's ITL child, looked up once per worker


class Pipeline:
    def __init__(self, model: ModelInfo, tokenizer, workers: WorkerRegistry,
                 router: Router, metrics: FrontendMetrics,
                 deadlines: CallDeadlines = CallDeadlines(),
                 migration: MigrationConfig = MigrationConfig()):
        self.model = model
        self.model_name = model.name
        self.max_model_len = model.max_model_len
        self.eos_token_ids = frozenset(model.config.eos_token_ids)
        self.tokenizer = tokenizer
        self.workers = workers
        self.router = router
        self.metrics = metrics
        self.clients = WorkerClients(deadlines)
        self.calls = WorkerCalls(self.clients)
        self.migration = migration
        workers.on_deregistered(self.calls.on_worker_lost)
        self.ready = False       # set once the expected workers have registered
        self.pool_status = ""    # the launcher's account of pools that lack workers
        self.draining = False
        self.idle = asyncio.Event()  # set whenever the router's books hold no request
        self.idle.set()

    @property
    def is_ready(self) -> bool:
        return self.ready and self.workers.count("decode") > 0

    @property
    def is_draining(self) -> bool:
        return self.draining

    @property
    def not_ready_reason(self) -> str:
        """Why requests are refused now, or "" when they are not."""
        if self.is_ready:
            return ""
        if not self.ready:
            return "the model or its workers are still starting"
        return self.pool_status or "no decode worker is registered"

    @property
    def num_inflight(self) -> int:
        return self.router.num_active_requests

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if self.draining:
            raise RequestRejected("the server is shutting down", 503, "service_unavailable")
        if not self.is_ready:
            raise RequestRejected(f"the server is not ready: {self.not_ready_reason}", 503,
                                  "service_unavailable")
        num_prompt = len(request.prompt_token_ids)
        if num_prompt >= self.max_model_len:
            raise RequestRejected(f"the prompt has {num_prompt} tokens but the model's context is "
                                  f"{self.max_model_len} tokens, which must also hold at least one "
                                  "generated token")
        params = request.params
        progress = _Progress(
            IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop,
                                   params.include_stop_str_in_output, params.skip_special_tokens,
                                   params.min_tokens),
            num_prompt, time.perf_counter(), "", request.request_id, token_ids=[])
        self.idle.clear()
        try:
            async with contextlib.aclosing(self._serve(request, progress)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.router.on_finished(request.request_id)
            if self.router.num_active_requests == 0:
                self.idle.set()

    async def _serve(self, request: GenerateRequest, progress: _Progress
                     ) -> AsyncIterator[GenerateChunk]:
        """Run the request, migrating it to other workers while they fail it."""
        failed: set[str] = set()  # workers that failed this request
        for num_migrations in itertools.count():
            attempt = self._attempt(request, progress, num_migrations)
            decision = self._route(request.request_id, attempt, failed)
            progress.attempt_has_token = False
            try:
                async with contextlib.aclosing(self._run(attempt, decision, progress)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except WorkerCallFailed as err:
                self.router.on_finished(request.request_id)  # the abandoned route's books
                failed.add(err.failure.worker_id)
                self._on_worker_failed(err)
                self._check_migration(request.request_id, err, num_migrations)

    def _attempt(self, request: GenerateRequest, progress: _Progress,
                 num_migrations: int) -> GenerateRequest:
        """The request as the workers see it on this attempt: after a migration, with the tokens
        already streamed appended to its prompt."""
        if num_migrations == 0:
            return request
        prompt, params = continuation(request.prompt_token_ids, progress.token_ids,
                                      request.params)
        return GenerateRequest(attempt_request_id(request.request_id, num_migrations), prompt,
                               params)

    def _route(self, request_id: str, attempt: GenerateRequest,
               failed: set[str]) -> RouteDecision:
        hashes = hash_prompt_blocks(attempt.prompt_token_ids, self.workers.block_size)
        # A retry avoids the workers that failed it: prefill then happens elsewhere or locally;
        # decode goes back to a failed worker only when no other is left.
        decode_pool = self.workers.pool("decode")
        decode_pool = [w for w in decode_pool if w.worker_id not in failed] or decode_pool
        prefill_pool = [w for w in self.workers.pool("prefill") if w.worker_id not in failed]
        try:
            return self.router.route(request_id, len(attempt.prompt_token_ids), hashes,
                                     decode_pool, prefill_pool)
        except LookupError as err:
            raise RequestRejected(str(err), 503, "service_unavailable") from err

    def _on_worker_failed(self, err: WorkerCallFailed) -> None:
        """A worker that is gone leaves the registry now (if it still lives, it registers again on
        its next heartbeat); its other calls in flight end with it."""
        failure = err.failure
        worker = self.workers.workers.get(failure.worker_id)
        if failure.is_worker_gone and worker is not None and worker.address == err.address:
            logger.warning("dropping %s worker %s: %s", failure.role, failure.worker_id,
                           failure.describe())
            self.router.remove_worker(worker.worker_id, worker.role)
            self.workers.deregister(worker.worker_id, f"a call failed ({failure.code})")

    def _check_migration(self, request_id: str, err: WorkerCallFailed,
                         num_migrations: int) -> None:
        """Raise the client's error unless the request may migrate."""
        failure = err.failure
        if failure.code == "INVALID_ARGUMENT":
            raise RequestRejected(failure.detail or "invalid request", 400) from err
        verdict = decide_migration(failure, num_migrations, self.workers.count("decode"),
                                   self.migration)
        if not verdict.migrate:
            logger.warning("request %s: %s", request_id, verdict.message)
            raise RequestRejected(verdict.message, 503, "worker_unavailable") from err
        self.metrics.migrations.labels(failure.role).inc()
        logger.warning("request %s: %s; migrating (%d of at most %d)", request_id,
                       failure.describe(), num_migrations + 1, self.migration.max_migrations)

    async def _run(self, attempt: GenerateRequest, decision: RouteDecision,
                   progress: _Progress) -> AsyncIterator[GenerateChunk]:
        decode = self.workers.workers[decision.decode_worker]
        progress.decode_worker = decode.worker_id
        progress.itl = None
        worker_request = wpb.WorkerGenerateRequest(
            request_id=attempt.request_id, prompt_token_ids=attempt.prompt_token_ids,
            sampling=sampling_to_proto(attempt.params))
        if decision.prefill_worker is None:
            self.metrics.local_prefill.inc()
            progress.first_worker = progress.first_worker or (decode.worker_id, "decode")
            async with contextlib.aclosing(self._decode(decode, worker_request, progress)) as out:
                async for chunk in out:
                    yield chunk
            return
        prefill = self.workers.workers[decision.prefill_worker]
        self.clients.send_soon(self.clients.expect_pull(decode.address, wpb.ExpectPullRequest(
            request_id=attempt.request_id, worker_id=prefill.worker_id,
            worker_address=prefill.address)))
        response = await self._prefill(prefill, worker_request)
        # From here the prefill worker holds the prompt's blocks pinned until a decode worker pulls
        # or releases them; on every other way out, they are released here.
        handed_over = False
        try:
            chunk = self._first_chunk(attempt, prefill, response, progress)
            yield chunk
            if chunk.finish_reason is not None:
                self._observe_end(progress, decode)
                return
            worker_request.remote.CopyFrom(wpb.RemotePrefill(
                kv=response.kv, first_token_id=response.first_token_id,
                worker_address=prefill.address))
            handed_over = True
            async with contextlib.aclosing(self._decode(decode, worker_request, progress)) as out:
                async for chunk in out:
                    yield chunk
        except WorkerCallFailed as err:
            # A decode worker that died before its first message pulled nothing; one that only
            # stopped answering may still be pulling, and releases the blocks itself (or the
            # lease does).
            handed_over = handed_over and not (err.failure.code == "UNAVAILABLE"
                                               and err.num_messages == 0)
            raise
        finally:
            if not handed_over:
                self.clients.send_soon(self.clients.release(prefill.address, attempt.request_id))

    async def _prefill(self, worker: WorkerState, request: wpb.WorkerGenerateRequest
                       ) -> wpb.PrefillResponse:
        try:
            return await self.calls.prefill(worker, wpb.PrefillRequest(
                request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                sampling=request.sampling))
        except BaseException:
            # The prefill may have finished, its blocks pinned, as the call failed or was
            # cancelled: release them (a no-op when nothing is pinned).
            self.clients.send_soon(self.clients.release(worker.address, request.request_id))
            raise

    def _first_chunk(self, attempt: GenerateRequest, prefill: WorkerState,
                     response: wpb.PrefillResponse, progress: _Progress) -> GenerateChunk:
        self.metrics.remote_prefill.inc()
        self.metrics.prefill_seconds.labels(prefill.worker_id, prefill.role).observe(
            response.prefill_seconds)
        if progress.first_worker is None:
            progress.num_cached_tokens = response.num_cached_tokens
            progress.first_worker = (prefill.worker_id, "prefill")
            progress.queue_s = response.queue_seconds
        logprobs = ([logprob_from_proto(response.first_logprob)]
                    if response.HasField("first_logprob") else [])
        return self._emit(progress, [response.first_token_id], logprobs,
                          *self._first_token_finish(attempt, response.first_token_id))

    async def _decode(self, worker: WorkerState, request: wpb.WorkerGenerateRequest,
                      progress: _Progress) -> AsyncIterator[GenerateChunk]:
        async with contextlib.aclosing(self.calls.generate(worker, request)) as messages:
            async for message in messages:
                chunk = self._decode_chunk(worker, request, message, progress)
                yield chunk
                if chunk.finish_reason is not None:
                    self._observe_end(progress, worker)
                    return

    def _decode_chunk(self, worker: WorkerState, request: wpb.WorkerGenerateRequest,
                      message: wpb.TokenChunk, progress: _Progress) -> GenerateChunk:
        if message.kv_transfer_bytes:
            labels = (worker.worker_id, worker.role)
            self.metrics.transfer_bytes.labels(*labels).inc(message.kv_transfer_bytes)
            self.metrics.transfer_seconds.labels(*labels).observe(message.kv_transfer_seconds)
        if message.recomputed:
            self.metrics.recomputed.inc()
        if progress.num_output_tokens == 0 and not request.HasField("remote"):
            progress.num_cached_tokens = max(progress.num_cached_tokens,
                                             message.num_cached_tokens)
            if progress.queue_s is None:   # prefilled here: its queue is this worker's
                progress.queue_s = message.queue_seconds
        stop_reason = message.stop_reason or None
        if stop_reason is not None and message.finish_reason == "stop" and stop_reason.isdigit():
            stop_reason = int(stop_reason)
        logprobs = [logprob_from_proto(lp) for lp in message.logprobs] if message.logprobs else []
        return self._emit(progress, list(message.token_ids), logprobs,
                          message.finish_reason or None, stop_reason)

    def _emit(self, progress: _Progress, token_ids: list[int], logprobs: list,
              finish_reason: str | None, stop_reason: str | int | None) -> GenerateChunk:
        progress.token_ids.extend(token_ids)
        matched = progress.detokenizer.add_tokens(token_ids) if token_ids else None
        if matched is not None:
            finish_reason, stop_reason = "stop", matched
        text = progress.detokenizer.get_text_delta(finished=finish_reason is not None)
        self._observe_tokens(progress, len(token_ids))
        if finish_reason is not None:
            self.metrics.requests.on_finished(progress, finish_reason)
        return GenerateChunk(token_ids, text, finish_reason, stop_reason, logprobs,
                             progress.num_prompt_tokens, progress.num_cached_tokens)

    def _first_token_finish(self, request: GenerateRequest, token_id: int
                            ) -> tuple[str | None, int | None]:
        """(finish reason, stop token) a prefill worker's first token implies, before decoding:
        the scheduler's own rule."""
        num_prompt = len(request.prompt_token_ids)
        reason = finish_after_token(request.params, token_id, 1, num_prompt + 1,
                                    self.eos_token_ids, self.max_model_len)
        if reason is None:
            return None, None
        return reason.value, stop_reason_of(reason, request.params, token_id)

    def _observe_tokens(self, progress: _Progress, num_tokens: int) -> None:
        if not num_tokens:
            return
        now = time.perf_counter()
        if not progress.attempt_has_token:
            progress.attempt_has_token = True
            self.router.on_first_token(progress.request_id)
        if progress.last_token_s is None:
            progress.first_token_s = now
            self.metrics.ttft.labels(*progress.first_worker).observe(now - progress.started_s)
        else:
            if progress.itl is None:
                progress.itl = self.metrics.itl.labels(progress.decode_worker, "decode")
            progress.itl.observe(now - progress.last_token_s)
        progress.last_token_s = now
        progress.num_output_tokens += num_tokens

    def _observe_end(self, progress: _Progress, worker: WorkerState) -> None:
        self.metrics.e2e.labels(worker.worker_id, worker.role).observe(
            time.perf_counter() - progress.started_s)

    def stub(self, worker: WorkerState) -> wgrpc.WorkerStub:
        return self.clients.stub(worker.address)

    async def close(self) -> None:
        await self.clients.close()

