"""Supervision of a deployment's workers: restart the dead with exponential backoff, and say the
truth about each pool.

A worker whose process exits (a crash, SIGKILL, the OOM killer) is started again after a backoff
that doubles with each death in a row, so a worker that dies at once on every start does not spin
the machine, and resets once a worker stayed up for `stable_after_s`. The pool status names what is
missing and why, for `/health` and logs: "decode pool has 0 of 1 workers ready; decode-0 died
(signal 9, SIGKILL), restarting in 2 s".

Knobs (RestartPolicy):
- `initial_backoff_s` (1 s): the first restart waits this long; a worker that was killed once
  comes back as fast as it can load.
- `max_backoff_s` (30 s): the cap of the doubling; a worker that cannot start is tried twice a
  minute, not given up on.
- `stable_after_s` (60 s): up this long, a worker's next death counts as the first again.

Pure: time comes in as `now_s`, exits as return codes; the serve loop does the starting.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s, got "
                             f"{self.initial_backoff_s} and {self.max_backoff_s}")
        if self.stable_after_s <= 0:
            raise ValueError(f"stable_after_s must be > 0, got {self.stable_after_s}")


def describe_exit(returncode: int) -> str:
    """'died (signal 9, SIGKILL)' or 'exited with code 1', from a Popen return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"died (signal {-returncode})"
        return f"died (signal {-returncode}, {name})"
    return f"exited with code {returncode}"


@dataclass(slots=True)
class _Worker:
    role: str
    started_s: float
    num_deaths_in_a_row: int = 0
    restart_at_s: float | None = None  # set while dead and waiting for its restart
    last_exit: str = ""


class Supervisor:
    def __init__(self, policy: RestartPolicy = RestartPolicy()):
        self.policy = policy
        self.workers: dict[str, _Worker] = {}
        self.num_restarts = 0

    def on_started(self, worker_id: str, role: str, now_s: float) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            self.workers[worker_id] = _Worker(role, now_s)
            return
        worker.started_s, worker.restart_at_s = now_s, None

    def on_exit(self, worker_id: str, returncode: int, now_s: float) -> float:
        """Record a worker's death; returns the seconds until its restart is due."""
        worker = self.workers[worker_id]
        if now_s - worker.started_s >= self.policy.stable_after_s:
            worker.num_deaths_in_a_row = 0
        delay_s = min(self.policy.initial_backoff_s * 2 ** worker.num_deaths_in_a_row,
                      self.policy.max_backoff_s)
        worker.num_deaths_in_a_row += 1
        worker.restart_at_s = now_s + delay_s
        worker.last_exit = describe_exit(returncode)
        return delay_s

    def due(self, now_s: float) -> list[str]:
        """Dead workers whose restart time has come; the caller starts them (on_started)."""
        due = [w for w, s in self.workers.items()
               if s.restart_at_s is not None and s.restart_at_s <= now_s]
        self.num_restarts += len(due)
        return sorted(due)

    def observe_ready(self, ready: set[str]) -> None:
        """Workers registered with the frontend: a restarted one that made it is healthy again."""
        for worker_id in ready:
            worker = self.workers.get(worker_id)
            if worker is not None and worker.restart_at_s is None:
                worker.last_exit = ""

    def is_pool_ready(self, role: str, ready: set[str]) -> bool:
        """Whether no worker of the role is dead or restarting."""
        return not self._missing(role, ready)

    def pool_status(self, role: str, ready: set[str], now_s: float) -> str:
        """One line on the role's pool: how many are ready, and what the others are doing.
        `ready`: the registered workers of this role. Only workers this supervisor restarts count
        as missing; workers a planner stopped on purpose are no longer members."""
        missing = self._missing(role, ready)
        line = f"{role} pool has {len(ready)} of {len(ready) + len(missing)} workers ready"
        return "; ".join([line, *(self._note(w, now_s) for w in missing)])

    def _missing(self, role: str, ready: set[str]) -> list[str]:
        return sorted(w for w, s in self.workers.items()
                      if s.role == role and w not in ready
                      and (s.restart_at_s is not None or s.last_exit))

    def _note(self, worker_id: str, now_s: float) -> str:
        worker = self.workers[worker_id]
        if worker.restart_at_s is not None:
            wait_s = max(worker.restart_at_s - now_s, 0.0)
            return f"{worker_id} {worker.last_exit}, restarting in {wait_s:.0f} s"
        since_s = now_s - worker.started_s
        return f"{worker_id} {worker.last_exit} and was started again {since_s:.0f} s ago"
