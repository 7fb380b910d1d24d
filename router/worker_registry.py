"""The frontend's view of its workers: who registered, where they listen, what they last reported,
and whether each is live, suspect or dead.

Pure state with no I/O. Workers register once, then heartbeat with their stats. Liveness keeps
"late" apart from "dead", as production systems do (Envoy's outlier detection ejects a host from
load balancing without ending its connections; Kubernetes' readiness probe takes a pod out of a
Service while only the liveness probe restarts it):
- suspect: no heartbeat for `suspect_after_s`. The worker is routed nothing new, but its requests
  in flight go on: on a starved host (a CPU shared by many processes, measured in the 10,000-request
  soak of benchmarks/RESULTS.md) a worker that still streams tokens can miss heartbeats for
  seconds. A heartbeat makes it routable again. When every worker of a role is suspect, they are
  routed to all the same (Envoy's panic mode): a host slow for everyone must not become an outage.
- dead: no heartbeat for `dead_after_s`, or evidence that the process is gone (the launcher saw it
  exit, a call or the frontend's standing KV event stream to it broke: its port closed, or the
  transport's keepalive gave up on it). Dead workers are
  dropped (`sweep` returns those past `dead_after_s`; `deregister` drops one), and whoever holds
  calls to workers hears of each one dropped (`on_deregistered`), so that those calls end at once
  and their requests migrate instead of waiting for their deadlines.
What the router itself routed to each worker (its load books) lives in the router
(router/routing.py), not here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.contracts.worker_stats import Registration, WorkerStats

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
LIVE, SUSPECT, DEAD = "live", "suspect", "dead"
# The thresholds' one default each; FrontendConfig (frontend/server.py) says why these values.
SUSPECT_AFTER_S = 3.0
DEAD_AFTER_S = 30.0


def liveness(silence_s: float, suspect_after_s: float, dead_after_s: float) -> str:
    """LIVE, SUSPECT or DEAD for a worker last heard from `silence_s` ago."""
    if silence_s > dead_after_s:
        return DEAD
    return SUSPECT if silence_s > suspect_after_s else LIVE


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
    is_suspect: bool = False     # heartbeats late: routed nothing new while others are on time


class WorkerRegistry:
    def __init__(self, model: str, block_size: int, suspect_after_s: float = SUSPECT_AFTER_S,
                 dead_after_s: float = DEAD_AFTER_S):
        if not 0 < suspect_after_s < dead_after_s:
            raise ValueError("need 0 < suspect_after_s < dead_after_s, got "
                             f"{suspect_after_s} and {dead_after_s}")
        self.model = model
        self.block_size = block_size
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        self.workers: dict[str, WorkerState] = {}
        self._deregistered: list[Callable[[WorkerState, str], None]] = []

    def on_deregistered(self, callback: Callable[[WorkerState, str], None]) -> None:
        """Call `callback(worker, reason)` whenever a worker is dropped, however it was."""
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
        """Record a heartbeat; False when the worker is not registered (it should register)."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        if worker.is_suspect:
            logger.warning("worker %s heartbeat again after %.1f s of silence; routable again",
                           worker_id, now_s - worker.last_seen_s)
            worker.is_suspect = False
        worker.stats = stats
        worker.last_seen_s = now_s
        return True

    def deregister(self, worker_id: str, reason: str = "it deregistered") -> None:
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            logger.info("worker %s deregistered: %s", worker_id, reason)
            for callback in self._deregistered:
                callback(worker, reason)

    def sweep(self, now_s: float) -> list[str]:
        """Mark workers whose heartbeats are late as suspect, and return those silent for more
        than dead_after_s (the caller drops them)."""
        dead = []
        for worker in self.workers.values():
            verdict = liveness(now_s - worker.last_seen_s, self.suspect_after_s,
                               self.dead_after_s)
            if verdict == DEAD:
                logger.warning("worker %s sent no heartbeat for %.0f s: declaring it dead",
                               worker.worker_id, now_s - worker.last_seen_s)
                dead.append(worker.worker_id)
            elif verdict == SUSPECT and not worker.is_suspect:
                logger.warning("worker %s sent no heartbeat for %.1f s: routing new requests "
                               "elsewhere, its requests in flight go on", worker.worker_id,
                               now_s - worker.last_seen_s)
                worker.is_suspect = True
        return dead

    def pool(self, role: str) -> list[WorkerState]:
        """Workers of one role that take new requests, in a stable order (by id): not draining,
        and on time with their heartbeats, unless every one is late (then the late ones)."""
        candidates = sorted((w for w in self.workers.values()
                             if w.role == role and not w.is_draining), key=lambda w: w.worker_id)
        return [w for w in candidates if not w.is_suspect] or candidates

    def set_draining(self, worker_id: str, is_draining: bool = True) -> bool:
        """Stop (or resume) routing new requests to a worker; False if it is not registered.
        Registering again (as a flipped worker does, in its new role) clears the mark."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return False
        worker.is_draining = is_draining
        return True

    def count(self, role: str) -> int:
        """Registered workers of the role, suspect ones included: they may still serve."""
        return sum(w.role == role for w in self.workers.values())
