"""When simulated clients send: `tandem bench`'s runner rules, without the waiting.

tandem.bench.runner sends each request at its arrival offset, but a turn of a session only after
the previous turn finished, and only while fewer than `max_concurrency` requests are in flight
(a request waiting for its session holds no slot). The simulator asks this book whether a request
may go now and tells it when one finishes; the book answers which requests become sendable.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence

from tandem.bench.arrivals import session_predecessors
from tandem.bench.records import BenchRequest

logger = logging.getLogger(__name__)


class ClientBook:
    def __init__(self, requests: Sequence[BenchRequest], offsets_s: Sequence[float],
                 max_concurrency: int | None):
        if len(offsets_s) != len(requests):
            raise ValueError("one arrival offset per request is needed")
        if max_concurrency is not None and max_concurrency <= 0:
            raise ValueError(f"--max-concurrency must be positive, got {max_concurrency}")
        self.offsets_s = offsets_s
        self.max_concurrency = max_concurrency
        self.num_active = 0
        self.num_unfinished = len(requests)
        self._queued: deque[int] = deque()  # sendable, waiting for a slot
        self._successors: dict[int, list[int]] = {}
        self.first_sends: list[tuple[float, int]] = []  # (time, index) with no predecessor
        for index, previous in enumerate(session_predecessors(requests)):
            if previous is None:
                self.first_sends.append((offsets_s[index], index))
            else:
                self._successors.setdefault(previous, []).append(index)

    def try_send(self, index: int) -> bool:
        """Whether the request may go now; if not it is queued for the next free slot."""
        if self.max_concurrency is not None and self.num_active >= self.max_concurrency:
            self._queued.append(index)
            return False
        self.num_active += 1
        return True

    def on_finished(self, index: int, now_s: float) -> list[tuple[float, int]]:
        """(time, index) of the requests this finish lets go: a queued one, the next turns."""
        self.num_unfinished -= 1
        self.num_active -= 1
        ready = [(now_s, self._queued.popleft())] if self._queued else []
        ready += [(max(now_s, self.offsets_s[i]), i) for i in self._successors.pop(index, ())]
        return ready
