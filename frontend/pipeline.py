"""The per-request pipeline of the frontend: route, prefill, decode, detokenize, stream.

A request is routed to a decode worker and, when the policy says so, first to a prefill worker,
whose answer (the first token and a KV handle) is streamed to the client at once and then handed to
the decode worker, which pulls the KV and continues. Text is made here, incrementally, and stop
strings are matched here: a match cancels the worker call, which aborts the request there.
Closing the stream (a client that went away) cancels whatever worker call is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.contracts.block_hash import hash_prompt_blocks
from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.model_info import ModelInfo
from tandem.engine.stop_rule import finish_after_token, stop_reason_of
from tandem.frontend.metrics import FrontendMetrics
from tandem.router.routing import RouteDecision, Router
from tandem.frontend.types import GenerateChunk, GenerateRequest, RequestRejected
from tandem.router.worker_registry import WorkerRegistry, WorkerState
from tandem.contracts.wire import logprob_from_proto, sampling_to_proto
from tandem.worker.clients import WorkerClients

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


class Pipeline:
    def __init__(self, model: ModelInfo, tokenizer, workers: WorkerRegistry,
                 router: Router, metrics: FrontendMetrics):
        self.model = model
        self.model_name = model.name
        self.max_model_len = model.max_model_len
        self.eos_token_ids = frozenset(model.config.eos_token_ids)
        self.tokenizer = tokenizer
        self.workers = workers
        self.router = router
        self.metrics = metrics
        self.clients = WorkerClients()
        self.ready = False       # set once the expected workers have registered
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
    def num_inflight(self) -> int:
        return self.router.num_active_requests

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if self.draining:
            raise RequestRejected("the server is shutting down", 503, "service_unavailable")
        if not self.is_ready:
            raise RequestRejected("the server has no ready decode worker", 503,
                                  "service_unavailable")
        num_prompt = len(request.prompt_token_ids)
        if num_prompt >= self.max_model_len:
            raise RequestRejected(f"the prompt has {num_prompt} tokens but the model's context is "
                                  f"{self.max_model_len} tokens, which must also hold at least one "
                                  "generated token")
        decision = self._route(request)
        decode = self.workers.workers[decision.decode_worker]
        self.idle.clear()
        try:
            async for chunk in self._run(request, decision, decode):
                yield chunk
        finally:
            self.router.on_finished(request.request_id)
            if self.router.num_active_requests == 0:
                self.idle.set()

    def _route(self, request: GenerateRequest) -> RouteDecision:
        hashes = hash_prompt_blocks(request.prompt_token_ids, self.workers.block_size)
        try:
            return self.router.route(request.request_id, len(request.prompt_token_ids), hashes,
                                     self.workers.pool("decode"), self.workers.pool("prefill"))
        except LookupError as err:
            raise RequestRejected(str(err), 503, "service_unavailable") from err

    async def _run(self, request: GenerateRequest, decision: RouteDecision,
                   decode: WorkerState) -> AsyncIterator[GenerateChunk]:
        params = request.params
        progress = _Progress(
            IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop,
                                   params.include_stop_str_in_output, params.skip_special_tokens),
            len(request.prompt_token_ids), time.perf_counter(), decode.worker_id,
            request.request_id)
        worker_request = wpb.WorkerGenerateRequest(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling=sampling_to_proto(params))
        if decision.prefill_worker is not None:
            prefill = self.workers.workers[decision.prefill_worker]
            self.clients.send_soon(self.clients.expect_pull(decode.address, wpb.ExpectPullRequest(
                request_id=request.request_id, worker_id=prefill.worker_id,
                worker_address=prefill.address)))
            response = await self._prefill(prefill, worker_request)
            self.metrics.remote_prefill.inc()
            self.metrics.prefill_seconds.labels(prefill.worker_id, prefill.role).observe(
                response.prefill_seconds)
            progress.num_cached_tokens = response.num_cached_tokens
            progress.first_worker = (prefill.worker_id, "prefill")
            logprobs = ([logprob_from_proto(response.first_logprob)]
                        if response.HasField("first_logprob") else [])
            chunk = self._emit(progress, [response.first_token_id], logprobs,
                               *self._first_token_finish(request, response.first_token_id))
            yield chunk
            if chunk.finish_reason is not None:
                self.clients.send_soon(self.clients.release(prefill.address, request.request_id))
                self._observe_end(progress, decode)
                return
            worker_request.remote.CopyFrom(wpb.RemotePrefill(
                kv=response.kv, first_token_id=response.first_token_id,
                worker_address=prefill.address))
        else:
            self.metrics.local_prefill.inc()
            progress.first_worker = (decode.worker_id, "decode")
        async for chunk in self._decode(decode, worker_request, progress):
            yield chunk

    async def _prefill(self, worker: WorkerState, request: wpb.WorkerGenerateRequest
                       ) -> wpb.PrefillResponse:
        try:
            return await self.stub(worker).Prefill(wpb.PrefillRequest(
                request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                sampling=request.sampling))
        except grpc.aio.AioRpcError as err:
            raise _worker_error(err, worker) from err

    async def _decode(self, worker: WorkerState, request: wpb.WorkerGenerateRequest,
                      progress: _Progress) -> AsyncIterator[GenerateChunk]:
        call = self.stub(worker).Generate(request)
        try:
            async for message in call:
                if message.kv_transfer_bytes:
                    labels = (worker.worker_id, worker.role)
                    self.metrics.transfer_bytes.labels(*labels).inc(message.kv_transfer_bytes)
                    self.metrics.transfer_seconds.labels(*labels).observe(
                        message.kv_transfer_seconds)
                if message.recomputed:
                    self.metrics.recomputed.inc()
                if not request.HasField("remote"):
                    progress.num_cached_tokens = max(progress.num_cached_tokens,
                                                     message.num_cached_tokens)
                stop_reason = message.stop_reason or None
                if stop_reason is not None and message.finish_reason == "stop" and \
                        stop_reason.isdigit():
                    stop_reason = int(stop_reason)
                chunk = self._emit(progress, list(message.token_ids),
                                   [logprob_from_proto(lp) for lp in message.logprobs],
                                   message.finish_reason or None, stop_reason)
                yield chunk
                if chunk.finish_reason is not None:
                    self._observe_end(progress, worker)
                    return
        except grpc.aio.AioRpcError as err:
            raise _worker_error(err, worker) from err
        finally:
            call.cancel()
        raise RequestRejected(f"decode worker {worker.worker_id} ended the stream early", 502,
                              "worker_error")

    def _emit(self, progress: _Progress, token_ids: list[int], logprobs: list,
              finish_reason: str | None, stop_reason: str | int | None) -> GenerateChunk:
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
        if progress.last_token_s is None:
            progress.first_token_s = now
            self.metrics.ttft.labels(*progress.first_worker).observe(now - progress.started_s)
            self.router.on_first_token(progress.request_id)
        else:
            self.metrics.itl.labels(progress.decode_worker, "decode").observe(
                now - progress.last_token_s)
        progress.last_token_s = now
        progress.num_output_tokens += num_tokens

    def _observe_end(self, progress: _Progress, worker: WorkerState) -> None:
        self.metrics.e2e.labels(worker.worker_id, worker.role).observe(
            time.perf_counter() - progress.started_s)

    def stub(self, worker: WorkerState) -> wgrpc.WorkerStub:
        return self.clients.stub(worker.address)

    async def close(self) -> None:
        await self.clients.close()


def _worker_error(err: grpc.aio.AioRpcError, worker: WorkerState) -> RequestRejected:
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return RequestRejected(err.details() or "invalid request", 400)
    return RequestRejected(f"{worker.role} worker {worker.worker_id} failed: "
                           f"{err.code().name} {err.details() or ''}".strip(), 503,
                           "worker_unavailable")
