"""The frontend's request calls to workers (Prefill, the Generate stream), each bounded.

A call ends with a `WorkerCallFailed` naming the worker, its role and a gRPC code name when the
worker answers with an error or its connection breaks (UNAVAILABLE: a closed port, or keepalive
pings unanswered, worker/auth.py), when it runs past its deadline (worker/clients.py,
`CallDeadlines`: Generate's is an idle deadline per message), and at once, code LOST, when the
worker is declared dead and drops out of the registry (its process exited, or its heartbeats
stopped for `dead_after_s`). A worker that is only late with its heartbeats (suspect) keeps its
calls. Prefill has a gRPC deadline;
Generate's idle deadline is a timer re-armed at each message. The pipeline turns these into
migrations (router/migration.py). A caller that is itself cancelled (a client that went away) sees
its cancellation, never a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.router.migration import WorkerFailure
from tandem.router.worker_registry import WorkerState
from tandem.worker.clients import WorkerClients

logger = logging.getLogger(__name__)


class WorkerCallFailed(Exception):
    def __init__(self, failure: WorkerFailure, address: str, num_messages: int = 0):
        super().__init__(failure.describe())
        self.failure = failure
        self.address = address            # of the worker instance that failed
        self.num_messages = num_messages  # received before the failure (streams)


@dataclass(slots=True, eq=False)
class _Tracked:
    call: grpc.aio.Call
    address: str
    ended_as: str | None = None  # LOST or DEADLINE_EXCEEDED once the frontend ended the call
    detail: str = ""
    timer: asyncio.TimerHandle | None = None
    deadline_s: float = 0.0                # of the current wait for a message
    waiting_since_s: float | None = None   # loop time that wait began; None between waits

    def end(self, code: str, detail: str) -> None:
        if self.ended_as is None:
            self.ended_as, self.detail = code, detail
            self.call.cancel()

    def arm(self, deadline_s: float) -> None:
        """Start the idle deadline: the stream's next message must come within deadline_s. One
        timer per call, moved only when it fires before the deadline is due: streams carry one
        message per token, and a timer made and cancelled per message cost about 3% of the
        frontend's CPU."""
        loop = asyncio.get_running_loop()
        now_s = loop.time()
        self.deadline_s, self.waiting_since_s = deadline_s, now_s
        if self.timer is None or self.timer.when() > now_s + deadline_s:
            self.stop()
            self.timer = loop.call_at(now_s + deadline_s, self._check)

    def disarm(self) -> None:
        """The message came (time the caller then takes, e.g. a slow client, is not counted)."""
        self.waiting_since_s = None

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        if self.waiting_since_s is None:   # not waiting: look again later (`arm` may bring it on)
            self.timer = loop.call_later(self.deadline_s, self._check)
            return
        due_s = self.waiting_since_s + self.deadline_s
        if loop.time() < due_s:
            self.timer = loop.call_at(due_s, self._check)
            return
        self.timer = None
        self.end("DEADLINE_EXCEEDED", f"no message for {self.deadline_s:.0f} s")


class WorkerCalls:
    def __init__(self, clients: WorkerClients):
        self.clients = clients
        self.deadlines = clients.deadlines
        self._inflight: dict[str, set[_Tracked]] = {}  # worker id -> its calls in flight

    def on_worker_lost(self, worker: WorkerState, reason: str) -> None:
        """End every call in flight to this worker instance (not to one that replaced it)."""
        for tracked in list(self._inflight.get(worker.worker_id, ())):
            if tracked.address == worker.address:
                tracked.end("LOST", reason)

    async def prefill(self, worker: WorkerState, request: wpb.PrefillRequest
                      ) -> wpb.PrefillResponse:
        call = self.clients.stub(worker.address).Prefill(request,
                                                        timeout=self.deadlines.prefill_s)
        tracked = self._track(worker, call)
        try:
            return await call
        except asyncio.CancelledError:
            lost = _lost(worker, tracked, 0)
            if lost is None:
                raise
            raise lost from None
        except grpc.aio.AioRpcError as err:
            raise _failed(worker, err) from err
        finally:
            self._untrack(worker, tracked)

    async def generate(self, worker: WorkerState, request: wpb.WorkerGenerateRequest
                       ) -> AsyncIterator[wpb.TokenChunk]:
        """The token stream; raises WorkerCallFailed, also when it ends without finishing."""
        call = self.clients.stub(worker.address).Generate(request)
        tracked = self._track(worker, call)
        num_messages = 0
        try:
            while True:
                tracked.arm(self.deadlines.token_idle_s if num_messages else
                            self.deadlines.first_token_s)
                message = await call.read()
                tracked.disarm()
                if message is grpc.aio.EOF:
                    raise WorkerCallFailed(WorkerFailure(
                        worker.role, worker.worker_id, "ABORTED", "the stream ended early"),
                        worker.address, num_messages)
                num_messages += 1
                yield message
        except asyncio.CancelledError:
            lost = _lost(worker, tracked, num_messages)
            if lost is None:
                raise
            raise lost from None
        except grpc.aio.AioRpcError as err:
            raise _failed(worker, err, num_messages) from err
        finally:
            self._untrack(worker, tracked)
            call.cancel()

    def _track(self, worker: WorkerState, call: grpc.aio.Call) -> _Tracked:
        tracked = _Tracked(call, worker.address)
        self._inflight.setdefault(worker.worker_id, set()).add(tracked)
        return tracked

    def _untrack(self, worker: WorkerState, tracked: _Tracked) -> None:
        tracked.stop()
        calls = self._inflight.get(worker.worker_id)
        if calls is not None:
            calls.discard(tracked)
            if not calls:
                del self._inflight[worker.worker_id]


def _failed(worker: WorkerState, err: grpc.aio.AioRpcError,
            num_messages: int = 0) -> WorkerCallFailed:
    return WorkerCallFailed(WorkerFailure(worker.role, worker.worker_id, err.code().name,
                                          err.details() or ""), worker.address, num_messages)


def _lost(worker: WorkerState, tracked: _Tracked, num_messages: int) -> WorkerCallFailed | None:
    """A CancelledError in a call means the frontend ended it (worker lost, idle deadline),
    unless our caller itself is being cancelled (a client that went away): then None, and the
    cancellation goes on. (Python 3.10 cannot tell when both happen at once.)"""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if tracked.ended_as is None or (cancelling is not None and cancelling() > 0):
        return None
    return WorkerCallFailed(WorkerFailure(worker.role, worker.worker_id, tracked.ended_as,
                                          tracked.detail), worker.address, num_messages)
