"""What the planner has asked for and not yet seen: pending adds, flips and removals, and failures.

Observations lag actions: a worker asked for shows up minutes later, first not ready; a flipped
worker drains before it serves in its new role; a removed one drains before it leaves. Counting
only what is ready would ask for the same worker again on every tick until it arrives. So each pool
is counted as the planner expects it to be:

    effective(role) = ready workers of that role (not being removed or flipped away)
                    + workers of that role still starting, within ready_timeout_s
                    + adds asked for that have not shown up yet, within ready_timeout_s
                    + workers flipping into that role

A new worker id that appears is matched to the oldest pending add of its role. A worker not ready
ready_timeout_s after it was asked for (or first seen, if the planner did not ask for it) has
failed: it no longer counts, so the target asks for a replacement, and the planner removes it. An
add that never shows up at all is dropped after ready_timeout_s, with a note, and asked again.
This is the fix for a planner stuck behind a worker that never becomes ready.

In advisory mode nothing is recorded (nothing is acted on), and the counts are the observation's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tandem.planner.observation import (ROLES, Action, AddWorker, FlipRole, Observation,
                                        RemoveWorker, WorkerView)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingAdd:
    role: str
    asked_at_s: float
    worker_id: str | None = None       # set once a new worker of that role shows up


@dataclass(slots=True)
class PendingFlip:
    to_role: str
    asked_at_s: float


class WorkerTracker:
    def __init__(self, ready_timeout_s: float):
        self.ready_timeout_s = ready_timeout_s
        self._adds: list[PendingAdd] = []
        self._flips: dict[str, PendingFlip] = {}
        self._removals: set[str] = set()
        self._not_ready_since_s: dict[str, float] = {}
        self._seen: set[str] = set()
        self.failed_ids: list[str] = []   # failed and still present: to remove

    def update(self, obs: Observation) -> list[str]:
        """Match the observation against what is pending; returns notes on what failed."""
        now, present = obs.time_s, {w.worker_id: w for w in obs.workers}
        self._match_new_workers(obs, now)
        notes = self._expire_adds(now)
        for worker in obs.workers:
            if worker.is_ready:
                self._not_ready_since_s.pop(worker.worker_id, None)
            else:
                self._not_ready_since_s.setdefault(worker.worker_id, now)
        notes += self._settle_flips(present, now)
        self._removals &= present.keys()
        for worker_id in list(self._not_ready_since_s):
            if worker_id not in present:
                del self._not_ready_since_s[worker_id]
        self.failed_ids = sorted(
            wid for wid, since in self._not_ready_since_s.items()
            if now - since >= self.ready_timeout_s and wid not in self._flips
            and wid not in self._removals)
        if self.failed_ids:
            notes.append(f"not ready after {self.ready_timeout_s:.0f} s, replacing: "
                         f"{', '.join(self.failed_ids)}")
        return notes

    def effective_counts(self, obs: Observation) -> dict[str, int]:
        counts = dict.fromkeys(ROLES, 0)
        failed = set(self.failed_ids)
        for worker in obs.workers:
            wid = worker.worker_id
            if wid in self._removals or wid in failed:
                continue
            role = self._flips[wid].to_role if wid in self._flips else worker.role
            counts[role] += 1
        for add in self._adds:
            if add.worker_id is None:
                counts[add.role] += 1
        return counts

    def has_pending(self, role: str) -> bool:
        """An add or flip into `role` not finished yet: its capacity is not in the metrics."""
        return (any(a.role == role for a in self._adds)
                or any(f.to_role == role for f in self._flips.values()))

    def is_busy(self, worker_id: str) -> bool:
        """Being removed or flipped: not a candidate for another action."""
        return worker_id in self._removals or worker_id in self._flips

    def record(self, actions: list[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, AddWorker):
                self._adds.append(PendingAdd(action.role, now))
            elif isinstance(action, FlipRole):
                self._flips[action.worker_id] = PendingFlip(action.to_role, now)
                self._not_ready_since_s.pop(action.worker_id, None)
            elif isinstance(action, RemoveWorker):
                self._removals.add(action.worker_id)

    def _match_new_workers(self, obs: Observation, now: float) -> None:
        for worker in obs.workers:
            if worker.worker_id in self._seen:
                continue
            self._seen.add(worker.worker_id)
            add = next((a for a in self._adds if a.role == worker.role and a.worker_id is None),
                       None)
            if add is not None:
                add.worker_id = worker.worker_id
                if not worker.is_ready:
                    # The start began when it was asked for, not when it became visible.
                    self._not_ready_since_s[worker.worker_id] = add.asked_at_s
        ready = {w.worker_id for w in obs.workers if w.is_ready}
        present = {w.worker_id for w in obs.workers}
        self._adds = [a for a in self._adds if a.worker_id is None
                      or (a.worker_id in present and a.worker_id not in ready)]

    def _expire_adds(self, now: float) -> list[str]:
        notes, kept = [], []
        for add in self._adds:
            if add.worker_id is None and now - add.asked_at_s >= self.ready_timeout_s:
                notes.append(f"a {add.role} worker asked for at t={add.asked_at_s:.0f} s never "
                             f"appeared within {self.ready_timeout_s:.0f} s; asking again")
                logger.warning(notes[-1])
            elif add.worker_id is None or now - add.asked_at_s < self.ready_timeout_s:
                kept.append(add)
        self._adds = kept
        return notes

    def _settle_flips(self, present: dict[str, WorkerView], now: float) -> list[str]:
        notes = []
        for worker_id, flip in list(self._flips.items()):
            worker = present.get(worker_id)
            if worker is None or (worker.role == flip.to_role and worker.is_ready):
                del self._flips[worker_id]
            elif now - flip.asked_at_s >= self.ready_timeout_s:
                del self._flips[worker_id]
                notes.append(f"flip of {worker_id} to {flip.to_role} not done after "
                             f"{self.ready_timeout_s:.0f} s; counting it as {worker.role}")
                logger.warning(notes[-1])
        return notes
