"""Turning target pool sizes into actions: which workers flip, leave, or get added.

Given the pools as the planner counts them (planner.worker_tracking) and the targets the policy
settled on, the actions are chosen in this order, and cut at `max_changes`:

1. Remove workers that failed to become ready (the target already leaves them out, so a
   replacement follows in step 2).
2. Grow each pool below its target. A worker flips in from a pool above its `flip_floor` (a pool
   allowed to shrink, or one with spare capacity: its target sized with the scale-down margin is
   lower than what it has, without waiting out the hold, because the growing pool's need is
   immediate); a flip keeps the weights loaded and takes seconds where a cold start takes
   minutes. Otherwise a new worker is added, while the GPU budget has room.
3. Shrink each pool above its target by removing workers: first ones still starting (they carry
   no requests and their start is no longer wanted), then the least loaded.

Flipped and removed workers are picked least loaded first (fewest queued plus running requests,
then lowest KV usage, then id, so the choice is reproducible). Growth goes first because an unmet
SLO costs requests, while an extra worker only costs GPU time.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.planner.observation import (ROLES, Action, AddWorker, FlipRole, Observation,
                                        RemoveWorker, WorkerView)


@dataclass(frozen=True, slots=True)
class ActionLimits:
    max_changes: int
    max_workers: int                   # the GPU budget, in workers
    may_shrink: frozenset[str]         # roles allowed to go down to their target now
    flip_floor: dict[str, int]         # the count each role may go down to by flipping a worker
                                       # to a growing pool (its margin-sized target when its
                                       # SLO allows, else its target)


def choose_actions(obs: Observation, current: dict[str, int], target: dict[str, int],
                   failed_ids: list[str], busy_ids: set[str],
                   limits: ActionLimits) -> tuple[list[Action], dict[str, int]]:
    """The actions, and each pool's count once they are done."""
    actions: list[Action] = [RemoveWorker(wid) for wid in failed_ids][:limits.max_changes]
    taken = set(busy_ids) | set(failed_ids)
    counts = dict(current)
    for role in ROLES:
        while counts[role] < target[role] and len(actions) < limits.max_changes:
            action = _grow(obs, role, current, counts, target, taken, limits)
            if action is None:
                break
            actions.append(action)
    for role in ROLES:
        while (counts[role] > target[role] and role in limits.may_shrink
               and len(actions) < limits.max_changes):
            worker = _least_loaded(obs, role, taken, starting_first=True)
            if worker is None:
                break
            taken.add(worker.worker_id)
            counts[role] -= 1
            actions.append(RemoveWorker(worker.worker_id))
    return actions, counts


def _grow(obs: Observation, role: str, current: dict[str, int], counts: dict[str, int],
          target: dict[str, int], taken: set[str], limits: ActionLimits) -> Action | None:
    for donor in ROLES:
        # A growing pool gives nothing: its count includes the workers it just asked for, and
        # flipping a ready one away would leave it short for a whole cold start.
        if (donor == role or counts[donor] <= limits.flip_floor[donor]
                or target[donor] > current[donor]):
            continue
        worker = _least_loaded(obs, donor, taken, starting_first=False)
        if worker is not None:
            taken.add(worker.worker_id)
            counts[donor] -= 1
            counts[role] += 1
            return FlipRole(worker.worker_id, role)
    if sum(counts.values()) >= limits.max_workers:
        return None
    counts[role] += 1
    return AddWorker(role)


def _least_loaded(obs: Observation, role: str, taken: set[str],
                  starting_first: bool) -> WorkerView | None:
    candidates = [w for w in obs.pool(role) if w.worker_id not in taken]
    if not starting_first:
        # Only a ready worker can flip: one still loading has no engine to switch.
        candidates = [w for w in candidates if w.is_ready]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (w.is_ready if starting_first else False,
                                          w.num_requests, w.kv_usage, w.worker_id))
