"""Routing policy: which decode worker, whether to prefill remotely, which prefill worker.

Pure functions over the registry's worker states, tested without I/O.

- Decode worker: the least loaded, by the router's own count of requests in flight on it (fresher
  than any heartbeat), ties broken by free KV blocks and then by worker id.
- Remote or local prefill (conditional disaggregation): a prompt goes to the prefill pool only when
  its uncached length on the chosen decode worker is at least `remote_prefill_min_tokens` (short
  prompts cost less to compute where they are than to move), and when some prefill worker has fewer
  than `max_prefill_queue` prefills in flight; otherwise the decode worker prefills it itself.
- Prefill worker: round robin over the workers with room in their queue.

`PrefixOverlap` is the seam for KV-aware routing: it tells how many leading blocks of a prompt a
worker already holds. Without a KV index every prompt counts as uncached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tandem.router.worker_registry import WorkerState


class PrefixOverlap(Protocol):
    def overlap_blocks(self, worker_id: str, block_hashes: list[int]) -> int: ...


class NoPrefixKnowledge:
    def overlap_blocks(self, worker_id: str, block_hashes: list[int]) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    remote_prefill_min_tokens: int = 256  # shorter uncached prompts are prefilled on the decode worker
    max_prefill_queue: int = 8            # prefills in flight per prefill worker before falling back

    def __post_init__(self) -> None:
        if self.remote_prefill_min_tokens < 0:
            raise ValueError("remote_prefill_min_tokens must be >= 0, got "
                             f"{self.remote_prefill_min_tokens}")
        if self.max_prefill_queue < 1:
            raise ValueError(f"max_prefill_queue must be >= 1, got {self.max_prefill_queue}")


@dataclass(frozen=True, slots=True)
class RouteDecision:
    decode_worker: str
    prefill_worker: str | None  # None: prefill on the decode worker
    num_uncached_tokens: int


class SimpleRouter:
    def __init__(self, config: RoutingConfig, overlap: PrefixOverlap | None = None):
        self.config = config
        self.overlap = overlap or NoPrefixKnowledge()
        self._next_prefill = 0

    def route(self, num_prompt_tokens: int, block_hashes: list[int], block_size: int,
              decode_pool: list[WorkerState], prefill_pool: list[WorkerState]) -> RouteDecision:
        if not decode_pool:
            raise LookupError("no decode worker is ready")
        decode = min(decode_pool, key=lambda w: (w.num_inflight, -w.stats.num_free_blocks,
                                                 w.worker_id))
        cached_tokens = self.overlap.overlap_blocks(decode.worker_id, block_hashes) * block_size
        uncached = max(num_prompt_tokens - cached_tokens, 0)
        prefill = None
        if uncached >= self.config.remote_prefill_min_tokens:
            prefill = self._pick_prefill(prefill_pool)
        return RouteDecision(decode.worker_id, prefill, uncached)

    def _pick_prefill(self, pool: list[WorkerState]) -> str | None:
        open_workers = [w for w in pool if w.num_inflight < self.config.max_prefill_queue]
        if not open_workers:
            return None
        worker = open_workers[self._next_prefill % len(open_workers)]
        self._next_prefill += 1
        return worker.worker_id
