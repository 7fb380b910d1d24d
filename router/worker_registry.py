"""The frontend's view of its workers: who registered, where they listen, what they last reported.

Pure state with no I/O. Workers register once, then heartbeat with their stats; a worker whose
heartbeats stop for `stale_after_s` is dropped. What the router itself routed to each worker (its
load books) lives in the router (router/routing.py), not here. Whoever holds calls to workers can
ask to hear of each worker dropped (`on_deregistered`), so that calls to a worker that stopped
answering end at once instead of waiting for their deadlines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.contracts.worker_stats import Registration, WorkerStats

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")


@dataclass(slots=True)
class WorkerState:
    worker_id: str
    role: str
    address: str
    block_size: int
    num_blocks: int
    last_seen_s: float
    stats: WorkerStats = field(default_factory=WorkerStats)
    is_draining: bool = False    # being flipped or removed: routed nothing new


class WorkerRegistry:
    def __init__(self, model: str, block_size: int, stale_after_s: float = 5.0):
        self.model = model
        self.block_size = block_size
        self.stale_after_s = stale_after_s
        self.workers: dict[str, WorkerState] = {}
        self._deregistered: list[Callable[[WorkerState], None]] = []

    def on_deregistered(self, callback: Callable[[WorkerState], None]) -> None:
        """Call `callback(worker)` whenever a worker is dropped, however it was."""
        self._deregistered.append(callback)

    def register(self, request: Registration, now_s: float) -> WorkerState:
        """Raises ValueError when the worker cannot serve alongside this frontend."""
        if request.role not in ROLES:
            raise ValueError(f"worker {request.worker_id}: role must be prefill or decode, "
                             f"got {request.role!r}")
        if request.block_size != self.block_size:
            raise ValueError(f"worker {request.worker_id} uses {request.block_size}-token KV "
                             f"blocks but the frontend expects {self.block_size}")
        if request.model != self.model:
            raise ValueError(f"worker {request.worker_id} serves {request.model!r}, the frontend "
                             f"{self.model!r}")
        worker = WorkerState(request.worker_id, request.role, request.address, request.block_size,
                             request.num_blocks, now_s)
        self.workers[request.worker_id] = worker
        logger.info("worker %s registered: %s at %s, %d blocks", request.worker_id,
                    request.role, request.address, request.num_blocks)
        return worker

    def heartbeat(self, worker_id: str, stats: WorkerStats, now_s: float) -> bool:
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        worker.stats = stats
        worker.last_seen_s = now_s
        return True

    def deregister(self, worker_id: str) -> None:
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            logger.info("worker %s deregistered", worker_id)
            for callback in self._deregistered:
                callback(worker)

    def stale(self, now_s: float) -> list[str]:
        """Workers whose heartbeats stopped more than stale_after_s ago."""
        stale = [w.worker_id for w in self.workers.values()
                 if now_s - w.last_seen_s > self.stale_after_s]
        for worker_id in stale:
            logger.warning("worker %s missed its heartbeats", worker_id)
        return stale

    def pool(self, role: str) -> list[WorkerState]:
        """Workers of one role that take new requests (not draining), in a stable order (by id)."""
        return sorted((w for w in self.workers.values() if w.role == role and not w.is_draining),
                      key=lambda w: w.worker_id)

    def set_draining(self, worker_id: str, is_draining: bool = True) -> bool:
        """Stop (or resume) routing new requests to a worker; False if it is not registered.
        Registering again (as a flipped worker does, in its new role) clears the mark."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        worker.is_draining = is_draining
        return True

    def count(self, role: str) -> int:
        return sum(w.role == role for w in self.workers.values())
