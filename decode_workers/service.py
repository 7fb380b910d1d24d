"""The decode worker: generates tokens, after pulling the prompt's KV from a prefill worker or
after prefilling the prompt itself.

With a remote prefill, the worker looks the prompt's blocks up in its own prefix cache, allocates
only the missing ones and READs them over NIXL from the prefill worker, whose agent metadata it
fetches once per peer. A pull that fails or times out falls back to computing the prompt here, so
the request still completes; the prefill worker's blocks are then released by RPC. While the
prompt is still prefilling, the frontend's `ExpectPull` lets the worker keep its path to that
prefill worker hot (pull_warmer.py). A Generate cancelled during its pull cancels the READ, frees
the blocks it had here and releases the prefill worker's.

Fault injection, for tests only: the environment variable `TANDEM_TEST_FAIL_KV_PULLS` (a fraction
in [0, 1], unset by default) makes that fraction of pulls fail as a NIXL error would, before any
byte moves, so the fallback path runs through real processes.
"""

from __future__ import annotations

import logging
import os
import random
import time

import grpc

from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.decode_workers.pull_warmer import PullWarmer
from tandem.engine.llm_engine import SequenceUpdate
from tandem.kv_transfer import KVRegion, KVTransferError
from tandem.contracts.wire import logprob_to_proto, sampling_from_proto
from tandem.contracts.kv_layout import KV_LAYOUT_VERSION
from tandem.worker.base import WorkerBase
from tandem.worker.clients import WorkerClients

logger = logging.getLogger(__name__)

FAIL_PULLS_ENV = "TANDEM_TEST_FAIL_KV_PULLS"


def _pull_failure_rate() -> float:
    value = os.environ.get(FAIL_PULLS_ENV, "")
    if not value:
        return 0.0
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{FAIL_PULLS_ENV} must be a fraction in [0, 1], got {value!r}")
    logger.warning("%s=%s: failing that fraction of KV pulls on purpose", FAIL_PULLS_ENV, value)
    return rate


class DecodeWorker(WorkerBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clients = WorkerClients()  # to prefill workers
        self.peers: dict[str, tuple[str, str]] = {}  # prefill worker id -> (address, NIXL agent)
        self.warmer = PullWarmer(self._warm) if self.agent is not None else None
        self.pull_failure_rate = _pull_failure_rate()  # tests only; see the module docstring

    async def ExpectPull(self, request: wpb.ExpectPullRequest, context):
        if self.warmer is not None and not self.async_engine.is_open(request.request_id):
            try:
                peer = await self._peer(request.worker_id, request.worker_address)
            except (KVTransferError, ValueError, grpc.aio.AioRpcError) as err:
                logger.info("request %s: cannot reach prefill worker %s yet (%s)",
                            request.request_id, request.worker_id, err)
            else:
                self.warmer.expect(request.request_id, peer)
        return wpb.ExpectPullResponse()

    def _warm(self, peer: str) -> None:
        if self.agent.warm(peer):
            self.transfers.warm_reads += 1

    async def close(self) -> None:
        if self.warmer is not None:
            await self.warmer.close()

    async def Generate(self, request: wpb.WorkerGenerateRequest, context):
        arrival_time = time.monotonic()   # a local prefill's queue time counts from here
        request_id = request.request_id
        prompt = list(request.prompt_token_ids)
        try:
            params = sampling_from_proto(request.sampling)
            stream = self.async_engine.open_stream(request_id)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        first = wpb.TokenChunk()
        try:
            if request.HasField("remote"):
                final = await self._pull_prompt(request, prompt, params, first)
            else:
                final = await self.async_engine.call(
                    lambda: self.engine.add_request(request_id, prompt, params, arrival_time))
        except ValueError as err:
            self.async_engine.abort(request_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except BaseException:  # cancelled while pulling: nothing may stay parked, here or there
            self.async_engine.abort(request_id)
            if request.HasField("remote"):
                self.clients.send_soon(self.clients.release(request.remote.worker_address,
                                                            request_id))
            raise
        finally:
            if self.warmer is not None:
                self.warmer.forget(request_id)  # the pull is over, or there was none
        if final is not None:
            self.async_engine.abort(request_id)  # only drops the stream: the request is done
            yield self._chunk(final, first)
            return
        async for update in self.async_engine.iterate(request_id, stream):
            yield self._chunk(update, first)
            first = None

    def _chunk(self, update: SequenceUpdate, first: wpb.TokenChunk | None) -> wpb.TokenChunk:
        """One update as a chunk; the first chunk also carries how the prompt got here and how
        long it queued."""
        chunk = wpb.TokenChunk()
        if first is not None:
            chunk.CopyFrom(first)
            chunk.queue_seconds = update.queue_time_s or 0.0
        chunk.token_ids.extend(update.new_token_ids)
        chunk.logprobs.extend(logprob_to_proto(t, lp) for t, lp in zip(update.new_token_ids,
                                                                        update.new_logprobs))
        chunk.num_cached_tokens = max(chunk.num_cached_tokens, update.num_cached_tokens)
        if update.finished:
            chunk.finish_reason = update.finish_reason.value
            if update.stop_reason is not None:
                chunk.stop_reason = str(update.stop_reason)
        return chunk

    async def _pull_prompt(self, request: wpb.WorkerGenerateRequest, prompt: list[int], params,
                           first: wpb.TokenChunk) -> SequenceUpdate | None:
        """Park the request, pull its missing prompt blocks, then let it decode."""
        request_id, remote = request.request_id, request.remote
        if remote.kv.layout_version != KV_LAYOUT_VERSION:
            raise ValueError(f"KV layout version {remote.kv.layout_version} from "
                             f"{remote.kv.worker_id}; this worker has {KV_LAYOUT_VERSION}")
        if remote.kv.block_size != self.engine.config.block_size:
            raise ValueError(f"prefill worker {remote.kv.worker_id} uses {remote.kv.block_size}-"
                             f"token blocks, this worker {self.engine.config.block_size}")
        plan = await self.async_engine.call(lambda: self.engine.add_remote_request(
            request_id, prompt, remote.first_token_id, params))
        if plan is None:  # no free blocks to pull into: the engine queued a local recompute
            first.recomputed = True
            self.clients.send_soon(self.clients.release(remote.worker_address, request_id))
            return None
        num_cached, local_blocks = plan
        first.num_cached_tokens = min(num_cached * self.engine.config.block_size, len(prompt))
        succeeded = await self._read(remote, list(remote.kv.block_ids)[num_cached:],
                                     local_blocks, request_id, first)
        first.recomputed = not succeeded
        if not (succeeded and local_blocks):  # no READ completed: no notification will come
            self.clients.send_soon(self.clients.release(remote.worker_address, request_id))
        return await self.async_engine.call(
            lambda: self.engine.complete_remote_request(request_id, succeeded)
            if self.engine.has_request(request_id) else None)

    async def _read(self, remote: wpb.RemotePrefill, remote_blocks: list[int],
                    local_blocks: list[int], request_id: str, first: wpb.TokenChunk) -> bool:
        if not local_blocks:
            return True  # everything was cached here; the release below frees the remote copy
        if self.agent is None:
            return False
        if self.warmer is not None:
            self.warmer.forget(request_id)  # the pull itself now keeps the path hot
        try:
            if self.pull_failure_rate and random.random() < self.pull_failure_rate:
                raise KVTransferError(f"{FAIL_PULLS_ENV} failed this pull on purpose")
            peer = await self._peer(remote.kv.worker_id, remote.worker_address)
            handle = await self.agent.read_blocks(peer, remote_blocks, local_blocks,
                                                  request_id.encode(),
                                                  timeout_s=self.options.transfer_timeout_s)
        except (KVTransferError, ValueError, grpc.aio.AioRpcError) as err:
            logger.warning("request %s: pulling KV from %s failed (%s); recomputing the prompt",
                           request_id, remote.kv.worker_id, err)
            return False
        first.kv_transfer_bytes = handle.nbytes
        first.kv_transfer_seconds = handle.elapsed_s or 0.0
        self.transfers.bytes_total += handle.nbytes
        self.transfers.seconds_total += first.kv_transfer_seconds
        return True

    async def _peer(self, worker_id: str, address: str) -> str:
        """The NIXL agent name of a prefill worker, fetching its transfer info the first time and
        again when the worker restarted."""
        known = self.peers.get(worker_id)
        if known is None or known[0] != address:  # new, or restarted (a new address and agent)
            info = await self.clients.stub(address).GetTransferInfo(
                wpb.TransferInfoRequest(), timeout=self.clients.deadlines.transfer_info_s)
            self.agent.add_peer(info.agent_name, info.agent_metadata,
                                KVRegion.from_bytes(info.region))
            self.peers[worker_id] = (address, info.agent_name)
        return self.peers[worker_id][1]

