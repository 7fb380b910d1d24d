"""The engine behind an asyncio server: a step loop plus per-request update streams.

Engine steps run in a worker thread (`asyncio.to_thread`), so the event loop keeps serving gRPC
while the model computes. Everything that changes engine state (adding, aborting, releasing) is
queued with `call` and applied by the loop between two steps, so the engine is only ever touched by
one thread at a time and needs no locks. The steps come from `LLMEngine.steps`: while a decode batch
runs steady, the next step is already queued on the device when the ops are applied and this step's
tokens are sent, so neither keeps the device waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from tandem.engine.llm_engine import LLMEngine, SequenceUpdate, merge_updates
from tandem.engine.step_log import StepLog
from tandem.contracts.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineDead(RuntimeError):
    """The step loop failed; the message says why."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, step_log: StepLog | None = None):
        """`step_log`: where each step's shape and times go (engine/step_log.py), or None."""
        self.engine = engine
        self._step_log = step_log
        if step_log is not None:
            engine.step_observer = step_log.observe
        self._ops: list[tuple[Callable[[], Any], asyncio.Future]] = []
        self._streams: dict[str, asyncio.Queue[SequenceUpdate | BaseException]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self._gaps = SlowGapLog()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._step_log is not None:
            self._step_log.close()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the engine between two steps and return its result."""
        if self._error is not None:
            raise EngineDead(f"engine stopped: {self._error}")
        future = asyncio.get_running_loop().create_future()
        self._ops.append((fn, future))
        self._wake.set()
        return await future

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[SequenceUpdate]:
        """Add a request and stream its updates; leaving early aborts it. Its queue time counts
        from this call: waiting for the step in progress to end is queueing too."""
        arrival_time = time.monotonic()
        stream = self.open_stream(request_id)
        try:
            await self.call(lambda: self.engine.add_request(request_id, prompt_token_ids, params,
                                                            arrival_time))
        except BaseException:
            self.abort(request_id)
            raise
        async for update in self.iterate(request_id, stream):
            yield update

    def open_stream(self, request_id: str) -> asyncio.Queue:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def is_open(self, request_id: str) -> bool:
        """Whether a stream is open for the request (from open_stream until it ends)."""
        return request_id in self._streams

    async def iterate(self, request_id: str, stream: asyncio.Queue
                      ) -> AsyncIterator[SequenceUpdate]:
        """Updates of a request added by the caller; closing early aborts the request."""
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise EngineDead(f"engine stopped: {item}") from item
                # Updates that queued while the reader was busy go out as one: a reader slower
                # than the steps gets fewer, larger messages instead of falling further behind.
                while not item.finished and not stream.empty():
                    later = stream.get_nowait()
                    if isinstance(later, BaseException):
                        stream.put_nowait(later)  # raised on the next round
                        break
                    item = merge_updates(item, later)
                finished = item.finished
                yield item
        finally:
            if finished:
                self._streams.pop(request_id, None)
            else:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Drop a request's stream and, at the next step boundary, the request. Never blocks."""
        self._streams.pop(request_id, None)
        if self._error is None:
            future = asyncio.get_running_loop().create_future()
            self._ops.append((lambda: self.engine.finish_request(request_id), future))
            self._wake.set()

    async def _run(self) -> None:
        try:
            while True:
                self._apply_ops()
                if not self.engine.has_unfinished_requests():
                    self._wake.clear()
                    if not self._ops:
                        await self._wake.wait()
                    continue
                steps = self.engine.steps(launch_before_yield=False)
                while (updates := await self._next_step(steps)) is not None:
                    for update in updates:
                        stream = self._streams.get(update.request_id)
                        if stream is not None:
                            stream.put_nowait(update)
                    self._gaps.step(updates)
                    self._apply_ops()
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # a failed step must fail its requests, not hang them
            logger.exception("engine step failed; failing every request")
            self._error = err
            for stream in self._streams.values():
                stream.put_nowait(err)
            for _, future in self._ops:
                if not future.done():
                    future.set_exception(EngineDead(f"engine stopped: {err}"))

    async def _next_step(self, steps) -> list[SequenceUpdate] | None:
        """The next step's updates, run on the step thread; timed into the step log if any."""
        log = self._step_log
        if log is None:
            return await asyncio.to_thread(next, steps, None)
        updates, began_s, ended_s = await asyncio.to_thread(_timed_next, steps)
        log.record(began_s, ended_s, time.perf_counter())
        return updates

    def _apply_ops(self) -> None:
        ops, self._ops = self._ops, []
        for fn, future in ops:
            try:
                result = fn()
            except Exception as err:
                if not future.done():
                    future.set_exception(err)
                continue
            if not future.done():
                future.set_result(result)


class SlowGapLog:
    """Logs inter-token gaps over SLOW_GAP_S that the worker itself made: the time between two
    steps that both gave a token to the same request, with what the later step carried. A gap a
    client sees is this plus the frontend's relay; with this log the two can be told apart. At
    most one line a second; the gaps in between are counted into the next line."""

    SLOW_GAP_S = 0.03
    LOG_EVERY_S = 1.0

    def __init__(self) -> None:
        self._last_s = 0.0
        self._last_updates: list[SequenceUpdate] = []
        self._logged_s = -self.LOG_EVERY_S
        self._unlogged = 0

    def step(self, updates: list[SequenceUpdate]) -> None:
        """Called after every step: the request ids are only looked at after a slow one."""
        now = time.perf_counter()
        if now - self._last_s > self.SLOW_GAP_S:
            self._check(now - self._last_s, now, updates)
        self._last_s, self._last_updates = now, updates

    def _check(self, gap_s: float, now: float, updates: list[SequenceUpdate]) -> None:
        ids, last_ids = _streaming_ids(updates), _streaming_ids(self._last_updates)
        if ids.isdisjoint(last_ids):
            return  # no request got a token in both steps: not an inter-token gap
        self._unlogged += 1
        if now - self._logged_s >= self.LOG_EVERY_S:
            logger.info("slow inter-token gap: %.1f ms between steps; the later step gave tokens "
                        "to %d requests, %d of them not in the step before (%d such gaps since "
                        "the last line)", gap_s * 1e3, len(ids), len(ids - last_ids),
                        self._unlogged)
            self._logged_s, self._unlogged = now, 0


def _timed_next(steps) -> tuple[list[SequenceUpdate] | None, float, float]:
    began_s = time.perf_counter()
    updates = next(steps, None)
    return updates, began_s, time.perf_counter()


def _streaming_ids(updates: list[SequenceUpdate]) -> set[str]:
    return {u.request_id for u in updates if u.new_token_ids and not u.finished}
