"""The prefill worker: runs prompts to their first token and holds their KV blocks for a pull.

A finished prefill leaves its blocks pinned in the engine. They are freed when the decode worker's
NIXL READ completes (its notification carries the request id), when the frontend calls Release
(the request ended at its first token, or the decode side gave up), or when the lease runs out.
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


class PrefillWorker(WorkerBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pinned_at: dict[str, float] = {}  # request id -> when its blocks were pinned

    async def Prefill(self, request: wpb.PrefillRequest, context) -> wpb.PrefillResponse:
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
        except asyncio.CancelledError:
            # The prefill may have finished, and pinned its blocks, in the step that was running.
            asyncio.ensure_future(self.release(request_id))
            raise
        block_ids = await self.async_engine.call(lambda: self.engine.pinned_blocks(request_id))
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
            prefill_seconds=time.perf_counter() - started)
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
                next_sweep = now + 0.5
                expired = [r for r, t in self.pinned_at.items() if now - t > self.options.lease_s]
                for request_id in expired:
                    logger.warning("request %s: lease of %.0f s expired before a pull; freeing "
                                   "its blocks", request_id, self.options.lease_s)
                    await self.release(request_id)
