"""The prefill worker: runs prompts to their first token and holds their KV blocks for a pull.

A finished prefill leaves its blocks pinned in the engine. They are freed when the decode worker's
NIXL READ completes (its notification carries the request id), when the frontend or the decode
worker calls Release (the request ended at its first token, its client went away, the decode side
gave up or never got it), or when the lease runs out. A Prefill call that fails or is cancelled at
any point releases whatever its request pinned. The lease covers every pinned request, not only
those whose answer went out: the sweep asks the engine what is pinned, so blocks pinned on a path
nobody foresaw still come back after `lease_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.engine.llm_engine import SequenceUpdate
from tandem.contracts.wire import logprob_to_proto, sampling_from_proto
from tandem.contracts.kv_layout import KV_LAYOUT_VERSION
from tandem.worker.base import WorkerBase

logger = logging.getLogger(__name__)

NOTIFICATION_POLL_S = 0.002
LEASE_SWEEP_INTERVAL_S = 0.5


class PrefillWorker(WorkerBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pinned_at: dict[str, float] = {}  # request id -> when its pin was first seen
        self._releases: set[asyncio.Task] = set()  # referenced until done, as asyncio requires

    async def Prefill(self, request: wpb.PrefillRequest, context) -> wpb.PrefillResponse:
        try:
            return await self._prefill(request, context)
        except BaseException:
            # Failed or cancelled at any await, perhaps after the prefill pinned its blocks (in the
            # step that was running): release them. The release is queued behind the engine's
            # current step, so a pin that step makes is freed too.
            self._release_soon(request.request_id)
            raise

    async def _prefill(self, request: wpb.PrefillRequest, context) -> wpb.PrefillResponse:
        request_id = request.request_id
        started = time.perf_counter()
        try:
            params = sampling_from_proto(request.sampling)
            last: SequenceUpdate | None = None
            async for update in self.async_engine.generate(
                    request_id, list(request.prompt_token_ids), params):
                last = update
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        # Read here, not queued behind the engine's next step (which would hold the answer for a
        # whole step when another prompt is waiting): the blocks were pinned before the final
        # update was sent, and only calls applied on this thread unpin them.
        block_ids = self.engine.pinned_blocks(request_id)
        if block_ids is None:  # ended some other way (aborted as it finished)
            await context.abort(grpc.StatusCode.ABORTED, f"request {request_id} was aborted")
        self.pinned_at[request_id] = time.monotonic()
        token_id = last.new_token_ids[0]
        response = wpb.PrefillResponse(
            first_token_id=token_id,
            kv=wpb.KVHandle(worker_id=self.options.worker_id, block_ids=block_ids,
                            layout_version=KV_LAYOUT_VERSION,
                            block_size=self.engine.config.block_size),
            num_cached_tokens=last.num_cached_tokens,
            prefill_seconds=time.perf_counter() - started,
            queue_seconds=last.queue_time_s or 0.0)
        if last.new_logprobs:
            response.first_logprob.CopyFrom(logprob_to_proto(token_id, last.new_logprobs[0]))
        logger.debug("request %s: prefilled %d tokens into %d blocks", request_id,
                     len(request.prompt_token_ids), len(block_ids))
        return response

    async def Release(self, request: wpb.ReleaseRequest, context) -> wpb.ReleaseResponse:
        return wpb.ReleaseResponse(released=await self.release(request.request_id))

    async def release(self, request_id: str) -> bool:
        self.pinned_at.pop(request_id, None)
        return await self.async_engine.call(lambda: self.engine.release_pinned(request_id))

    def _release_soon(self, request_id: str) -> None:
        task = asyncio.ensure_future(self.release(request_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def background(self) -> None:
        """Free pinned blocks on pull notifications, and when leases expire."""
        next_sweep = time.monotonic()
        while True:
            await asyncio.sleep(NOTIFICATION_POLL_S)
            if self.agent is not None:
                for peer, message in self.agent.get_notifications():
                    request_id = message.decode(errors="replace")
                    if await self.release(request_id):
                        logger.debug("request %s: blocks pulled by %s, freed", request_id, peer)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + LEASE_SWEEP_INTERVAL_S
                await self._sweep_leases(now)

    async def _sweep_leases(self, now_s: float) -> None:
        pinned = set(await self.async_engine.call(self.engine.pinned_request_ids))
        for request_id in pinned:
            self.pinned_at.setdefault(request_id, now_s)
        for request_id in [r for r in self.pinned_at if r not in pinned]:
            del self.pinned_at[request_id]  # released since; its lease is over
        expired = [r for r, t in self.pinned_at.items() if now_s - t > self.options.lease_s]
        for request_id in expired:
            logger.warning("request %s: lease of %.0f s expired before a pull; freeing its "
                           "blocks", request_id, self.options.lease_s)
            await self.release(request_id)
