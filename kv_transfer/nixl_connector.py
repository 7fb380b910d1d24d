"""NixlKVAgent: pull KV blocks out of a peer worker's memory with NIXL over UCX.

Every worker builds one agent around its KV tensor and registers the whole tensor once. The two
sides of a remote prefill then play these parts (DESIGN.md, "One request, end to end", step 4):

- the prefill worker owns the blocks. It hands `metadata()` and `region.to_bytes()` to the decode
  worker (over gRPC, which is not this module's business), and calls `get_notifications()` to learn
  which requests have been pulled, so that it can free their blocks;
- the decode worker calls `add_peer()` with those bytes once per prefill worker, then
  `start_read()` / `poll()` / `release()` (or `await read_blocks()`) with the block ids of both
  sides and the request id as the notification. NIXL sends the notification after the READ's data
  has moved, so receiving it means the prefill worker's blocks are no longer needed.

Pull (READ) rather than push keeps the decode worker in charge of its own memory: it reads only
once it has allocated the destination blocks, and a decode worker that is gone simply never reads.

Transports. On one host UCX needs no settings, also inside a loopback-only network namespace
(`unshare -n`, then `ip link set lo up`): it runs over TCP on `lo` plus cross-memory attach for
host memory (CUDA IPC for GPU memory), and the namespace keeps both. `UCX_*` variables a user sets
are left alone, with one caveat: NIXL's UCX backend asks UCX for peer failure detection, which the
shared-memory transports lack, so a `UCX_TLS` without `tcp` (`sm`, or an empty string) makes
creating the backend fail. Both agents in one process work but take a slow path (DESIGN.md).

Threads: call an agent from one thread (the worker's event loop). The NIXL agent is still created
with strict thread synchronisation, so a stray call from another thread cannot corrupt it.

Descriptors. Each side's blocks are handed to NIXL once as a prepared list, one descriptor per
block (our own at start, a peer's when it is added); a pull then names blocks by index, and NIXL
merges pairs consecutive on both sides into one descriptor. Nothing is built per pull but the
request itself.

Warm paths. A pull after some milliseconds without one is slow to start: measured on 2x H200, a
1k-token pull after a 50 ms pause took 646 us against 367 us back to back (posting it 190 us
instead of 22, and the copy itself slower), and a torch peer copy pays the same; a pull 1 ms after
the last one pays nothing of it. `warm` reads one block of a peer into a spare block of our own
KV cache, one no request uses, so that a decode worker expecting a pull can keep the path hot at
the price of a small copy per call. The destination matters: a read every millisecond into the KV
cache brought that pull to 378-402 us, the same reads into a separately registered buffer to
483 us.

NIXL's progress thread (`progress_thread`) is for the owner's side only. Measured on 2x H200 over
NVLink (benchmarks/RESULTS.md), a READ that carries a notification completes only once the
owner's UCX worker has run: with the thread, a 1k-token (128 MiB) pull takes the time of a peer
copy; without it, it waits for the owner's next call into NIXL (a 1 ms poll added 0.7 ms). On the
reader's side the thread only competes with the reader's own polling, and pulls of any size ran
at about 290 GB/s with it against 390 GB/s (the peer copy's rate) without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tandem.kv_transfer.descriptors import (
    block_descriptors,
    check_block_pairs,
)
from tandem.kv_transfer.read_handle import KVReadHandle, KVTransferError, TransferState
from tandem.kv_transfer.region import KVRegion

logger = logging.getLogger(__name__)

BACKEND = "UCX"
# read_blocks' polling interval. An asyncio timer cannot wait this little: the event loop's epoll
# timeout has millisecond resolution, so asyncio.sleep(50e-6) really sleeps about 1.1 ms, which
# added a millisecond to every pull. Between polls the loop gets one turn (asyncio.sleep(0)) and
# the thread naps this long with time.sleep, which does keep microseconds and releases the GIL.
POLL_INTERVAL_S = 20e-6
MAX_NOTIFY_NBYTES = 1024  # a request id; NIXL sends the notification as one small message


@dataclass(frozen=True, slots=True)
class _Peer:
    agent_metadata: bytes
    region: KVRegion
    # NIXL's prepared list of the peer's blocks; not part of what identifies the peer.
    blocks: Any = field(default=None, compare=False)


def _prepare_blocks(agent: Any, agent_name: str, region: KVRegion) -> Any:
    """NIXL's prepared list of `region`'s blocks, one descriptor each, for pulls to index into;
    `agent_name` is NIXL's NIXL_INIT_AGENT for our own blocks, else the peer's name."""
    rows = block_descriptors(region.base_addr, region.block_nbytes, region.num_blocks,
                             region.dev_id)
    return agent.prep_xfer_dlist(agent_name, rows, region.mem_type, backends=[BACKEND])


class NixlKVAgent:
    """A NIXL agent (UCX backend) with one KV tensor registered, pulling blocks from peers."""

    def __init__(
        self, agent_name: str, kv_cache: torch.Tensor, *, progress_thread: bool = True,
        spare_block: int | None = None,
    ) -> None:
        """`progress_thread`: run NIXL's progress thread; True for a worker whose blocks are read
        (prefill), False for one that only reads (decode). `spare_block`: a block of `kv_cache`
        that no request ever uses, for `warm` to read into. See the module's docstring."""
        if not agent_name:
            raise ValueError("agent_name must be a non-empty string, unique among the workers")
        self.name = agent_name
        self.region = KVRegion.from_tensor(kv_cache)
        if spare_block is not None and not 0 <= spare_block < self.region.num_blocks:
            raise ValueError(f"spare_block {spare_block} is not a block of the KV cache "
                             f"({self.region.num_blocks} blocks)")
        self.spare_block = spare_block
        # NIXL holds raw addresses into this tensor: keep it alive as long as the registration.
        self._kv_cache = kv_cache
        self._peers: dict[str, _Peer] = {}
        self._agent: Any = _create_agent(agent_name, progress_thread)
        region = self.region
        self._registration = self._agent.register_memory(
            [(region.base_addr, region.total_nbytes, region.dev_id, "")],
            mem_type=region.mem_type,
            backends=[BACKEND],
        )
        self._local_blocks = _prepare_blocks(self._agent, "NIXL_INIT_AGENT", region)
        self._warm_reads: dict[str, Any] = {}  # peer name -> NIXL handle of its warming READ
        self._reads_in_flight: Counter[str] = Counter()  # peer name -> pulls not yet released
        logger.info(
            "NIXL agent %s registered %d KV blocks of %d bytes in %s (device %d)",
            agent_name, region.num_blocks, region.block_nbytes, region.mem_type, region.dev_id,
        )

    # -- metadata exchange -----------------------------------------------------------------------

    def metadata(self) -> bytes:
        """NIXL agent metadata for peers' `add_peer`; send `self.region.to_bytes()` with it."""
        return self._live_agent().get_agent_metadata()

    def add_peer(self, peer_name: str, agent_metadata: bytes, region: KVRegion) -> None:
        """Make `peer_name`'s blocks readable. Adding the same peer again is a no-op; a peer
        whose metadata changed (it restarted under the same name) is reloaded."""
        agent = self._live_agent()
        peer = _Peer(agent_metadata, region)
        if self._peers.get(peer_name) == peer:
            return
        if peer_name == self.name:
            raise ValueError(f"agent {self.name!r} cannot add itself as a peer")
        if region.block_nbytes != self.region.block_nbytes:
            raise ValueError(
                f"peer {peer_name!r} has {region.block_nbytes}-byte KV blocks but this worker has "
                f"{self.region.block_nbytes}-byte blocks: both must run the same model, block "
                "size and KV dtype"
            )
        if peer_name in self._peers:
            logger.info("peer %s changed its metadata, reloading it", peer_name)
            self.remove_peer(peer_name)
        try:
            loaded_name = _as_str(agent.add_remote_agent(agent_metadata))
        except Exception as e:
            # Malformed metadata and an unreachable peer mean the same to the caller: this peer
            # cannot be read from, so its prompts are recomputed.
            raise KVTransferError(
                f"NIXL could not load the metadata of peer {peer_name!r} ({e}): is the peer "
                "running, and are the bytes the output of its metadata()?"
            ) from e
        if loaded_name != peer_name:
            if loaded_name not in self._peers:  # never drop a peer that was added correctly
                agent.remove_remote_agent(loaded_name)
            raise ValueError(
                f"the metadata given for peer {peer_name!r} belongs to agent {loaded_name!r}"
            )
        try:
            peer = replace(peer, blocks=_prepare_blocks(agent, peer_name, region))
        except Exception as e:
            agent.remove_remote_agent(peer_name)
            raise KVTransferError(
                f"NIXL could not prepare the blocks of peer {peer_name!r} ({e}): does its region "
                "match its registered KV tensor?"
            ) from e
        self._peers[peer_name] = peer
        logger.info("added peer %s: %d blocks in %s", peer_name, region.num_blocks, region.mem_type)

    def remove_peer(self, peer_name: str) -> None:
        """Forget a peer and drop the connection to it; unknown names are ignored."""
        peer = self._peers.pop(peer_name, None)
        if peer is None:
            return
        try:
            self._drop_warm_read(peer_name)
            peer.blocks.release()
            self._live_agent().remove_remote_agent(peer_name)
        except Exception:
            logger.warning("NIXL failed to remove peer %s", peer_name, exc_info=True)
        logger.info("removed peer %s", peer_name)

    @property
    def peer_names(self) -> list[str]:
        return list(self._peers)

    # -- pulling blocks --------------------------------------------------------------------------

    def start_read(
        self,
        peer_name: str,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        notify: bytes,
    ) -> KVReadHandle:
        """Post a READ of the peer's `remote_block_ids` into our `local_block_ids`, pairwise.

        `notify` (the request id) reaches the peer once the READ is complete. Poll the handle to
        DONE or ERR, then release it.
        """
        peer = self._peers.get(peer_name)
        if peer is None:
            raise ValueError(
                f"unknown peer {peer_name!r}: call add_peer first (known: {self.peer_names})"
            )
        started_s = time.perf_counter()
        request_id = _check_notify(notify)
        remote, local = list(remote_block_ids), list(local_block_ids)
        check_block_pairs(remote, local, peer.region.num_blocks, self.region.num_blocks,
                          f"remote ({peer_name})", "local")
        xfer = self._prepare_read(peer_name, peer, remote, local, notify, request_id)
        handle = KVReadHandle(
            peer_name=peer_name,
            request_id=request_id,
            remote_block_ids=remote,
            local_block_ids=local,
            nbytes=len(local) * self.region.block_nbytes,
            started_s=started_s,
            xfer=xfer,
        )
        self._reads_in_flight[peer_name] += 1
        self._post(handle)
        return handle

    def poll(self, handle: KVReadHandle) -> TransferState:
        """'DONE', 'PROC' (still moving) or 'ERR'. Never blocks."""
        if handle.xfer is None:
            raise ValueError(f"request {handle.request_id}: the READ was already released")
        agent = self._live_agent()
        try:
            state = agent.check_xfer_state(handle.xfer)
        except Exception:
            logger.warning("request %s: NIXL could not report the READ's state",
                           handle.request_id, exc_info=True)
            state = "ERR"
        if state == "DONE" and handle.finished_s is None:
            handle.finished_s = time.perf_counter()
        if state == "DONE" and logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "request %s: read %d blocks (%d descriptors, %d bytes) from %s in %.3f ms, "
                "posted %.0f us after the call",
                handle.request_id, handle.num_blocks, handle.num_descriptors, handle.nbytes,
                handle.peer_name, handle.elapsed_s * 1e3,
                (handle.posted_s - handle.started_s) * 1e6,
            )
        elif state == "ERR":
            logger.warning("request %s: READ from %s failed", handle.request_id, handle.peer_name)
        return state

    def release(self, handle: KVReadHandle) -> bool:
        """Free NIXL's handle, cancelling the READ if it is still moving. False when NIXL could
        not cancel it: its destination blocks may still change. Releasing twice is a no-op."""
        xfer, handle.xfer = handle.xfer, None
        if xfer is None:
            return True
        self._reads_in_flight[handle.peer_name] -= 1
        try:
            xfer.release()
        except Exception:
            # NIXL keeps a handle it could not release and frees it when the agent goes away.
            logger.error("request %s: NIXL could not cancel the READ from %s; its destination "
                         "blocks may still be written", handle.request_id, handle.peer_name,
                         exc_info=True)
            return False
        return True

    async def read_blocks(
        self,
        peer_name: str,
        remote_block_ids: list[int],
        local_block_ids: list[int],
        notify: bytes,
        timeout_s: float = 30.0,
    ) -> KVReadHandle:
        """Pull the blocks and wait; raise KVTransferError on an error or after `timeout_s`.

        Returns the released handle: `elapsed_s` and `nbytes` give the achieved bandwidth.
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        handle = self.start_read(peer_name, remote_block_ids, local_block_ids, notify)
        try:
            await self._wait(handle, timeout_s)
        except KVTransferError as e:
            raise KVTransferError(str(e), in_flight=not self.release(handle)) from e
        finally:
            self.release(handle)
        return handle

    def warm(self, peer_name: str) -> bool:
        """Read one block of the peer into our spare block, to keep the path to it hot (see the
        module's docstring). Never blocks and notifies nobody; True when a READ was posted, False
        while the previous one is still moving or a pull from the peer is: that keeps the path hot
        by itself, and a read posted behind it stalled the caller for milliseconds (measured on
        2x H200). KVTransferError when NIXL fails."""
        if self.spare_block is None:
            raise ValueError(f"agent {self.name!r} has no spare block to warm paths with")
        peer = self._peers.get(peer_name)
        if peer is None:
            raise ValueError(f"unknown peer {peer_name!r}: call add_peer first")
        agent = self._live_agent()
        if self._reads_in_flight[peer_name]:
            return False
        xfer = self._warm_reads.get(peer_name)
        try:
            if xfer is None:
                xfer = agent.make_prepped_xfer("READ", self._local_blocks, [self.spare_block],
                                               peer.blocks, [0], backends=[BACKEND])
                self._warm_reads[peer_name] = xfer
            elif agent.check_xfer_state(xfer) == "PROC":
                return False
            state = agent.transfer(xfer)  # a finished handle may be posted again
        except Exception as e:
            state, cause = "ERR", e
        else:
            cause = None
        if state == "ERR":
            self._drop_warm_read(peer_name)
            raise KVTransferError(f"warming the path to {peer_name} failed"
                                  + (f": {cause}" if cause else "")) from cause
        return True

    # -- the owner's side ------------------------------------------------------------------------

    def get_notifications(self) -> list[tuple[str, bytes]]:
        """(peer name, message) for every READ of our blocks completed since the last call."""
        notifs = self._live_agent().get_new_notifs()
        return [(_as_str(peer), msg) for peer, msgs in notifs.items() for msg in msgs]

    # -- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop every peer and the registration. Safe to call twice."""
        if self._agent is None:
            return
        for peer_name in list(self._peers):
            self.remove_peer(peer_name)
        try:
            self._local_blocks.release()
            self._agent.deregister_memory(self._registration, backends=[BACKEND])
        except Exception:
            logger.warning("NIXL agent %s could not deregister its KV cache", self.name,
                           exc_info=True)
        self._agent = None
        logger.info("NIXL agent %s closed", self.name)

    def __enter__(self) -> NixlKVAgent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------------

    def _live_agent(self) -> Any:
        if self._agent is None:
            raise KVTransferError(f"NIXL agent {self.name!r} is closed")
        return self._agent

    def _drop_warm_read(self, peer_name: str) -> None:
        xfer = self._warm_reads.pop(peer_name, None)
        if xfer is not None:
            try:
                xfer.release()
            except Exception:  # still moving: NIXL frees it with the agent; only the spare changes
                logger.info("NIXL could not release the warming READ from %s", peer_name,
                            exc_info=True)

    def _prepare_read(
        self, peer_name: str, peer: _Peer, remote: list[int], local: list[int], notify: bytes,
        request_id: str,
    ) -> Any:
        agent = self._live_agent()
        try:
            return agent.make_prepped_xfer(
                "READ", self._local_blocks, local, peer.blocks, remote, notify,
                backends=[BACKEND],
            )
        except Exception as e:
            raise KVTransferError(
                f"request {request_id}: NIXL could not prepare the READ from {peer_name}: {e}"
            ) from e

    def _post(self, handle: KVReadHandle) -> None:
        try:
            state = self._live_agent().transfer(handle.xfer)
        except Exception as e:
            state, cause = "ERR", e
        else:
            cause = None
        if state == "ERR":
            self.release(handle)
            raise KVTransferError(
                f"request {handle.request_id}: posting the READ from {handle.peer_name} failed"
                + (f": {cause}" if cause else "")
            ) from cause
        handle.posted_s = time.perf_counter()
        if state == "DONE":
            handle.finished_s = handle.posted_s

    async def _wait(self, handle: KVReadHandle, timeout_s: float) -> None:
        deadline = handle.started_s + timeout_s
        while True:
            state = self.poll(handle)
            if state == "DONE":
                return
            what = f"request {handle.request_id}: READ of {handle.num_blocks} blocks"
            if state == "ERR":
                raise KVTransferError(f"{what} from {handle.peer_name} failed; is the peer alive?")
            if time.perf_counter() >= deadline:
                raise KVTransferError(f"{what} from {handle.peer_name} took over {timeout_s} s")
            await asyncio.sleep(0)
            time.sleep(POLL_INTERVAL_S)


def _create_agent(agent_name: str, progress_thread: bool) -> Any:
    try:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
    except ImportError as e:
        raise ImportError(
            "tandem.kv_transfer needs NIXL. On a CUDA 12 or CPU-only machine: "
            "`pip install nixl-cu12==1.5.1 && pip install --no-deps nixl==1.5.1`; "
            "with CUDA 13, nixl-cu13 in place of nixl-cu12"
        ) from e
    config = nixl_agent_config(
        enable_prog_thread=progress_thread,
        backends=[BACKEND],
        sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
    )
    agent = nixl_agent(agent_name, config)
    if BACKEND not in agent.backends:
        raise KVTransferError(
            f"NIXL has no {BACKEND} backend here (plugins found: {agent.get_plugin_list()}); "
            "reinstall the nixl wheel, which ships it"
        )
    return agent


def _check_notify(notify: bytes) -> str:
    """The notification carries the request id, by which the owner frees its blocks."""
    if not isinstance(notify, bytes) or not notify:
        raise ValueError(f"notify must be the request id as non-empty bytes, got {notify!r}")
    if len(notify) > MAX_NOTIFY_NBYTES:
        raise ValueError(f"notify must be at most {MAX_NOTIFY_NBYTES} bytes, got {len(notify)}")
    return notify.decode("utf-8", errors="replace")


def _as_str(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name
