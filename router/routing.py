"""Routing one request: which decode worker, whether to prefill remotely, which prefill worker.

The decode worker is chosen by the router policy (router/kv_policy.py: KV overlap against load, or
round-robin, random, least-loaded) over the decode pool's KV index. The prompt is then prefilled
remotely only when its uncached length on that decode worker is at least
`remote_prefill_min_tokens` (a short remainder costs less to compute where it is than to move) and
some prefill worker has fewer than `max_prefill_queue` prefills in flight; otherwise the decode
worker prefills it itself (conditional disaggregation). The prefill worker is chosen by the same
policy over the prefill pool's own index and load.

A prompt's blocks count as held by the worker it was routed to from the moment of routing, until
the request ends, whatever the worker's events say yet: a second request of the same prefix that
arrives while the first is still being prefilled then follows it there instead of being spread by
load (the worker's own prefix cache shares the blocks once computed). SGLang's cache-aware router
inserts a prompt into its tree at routing time for the same reason.

The router also keeps the active-load books both policies read, the frontend's only count of what
is in flight: requests and blocks added when a request is routed, prefill blocks (and the prefill
worker's request) dropped at its first token, everything dropped when it finishes or is aborted,
and corrections from what workers report in their heartbeats. No I/O happens here.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import repeat

from tandem.router.kv_index import KVIndex
from tandem.router.kv_policy import ActiveLoadTracker, KVPolicyConfig, KVRouterPolicy
from tandem.router.worker_registry import WorkerState


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    remote_prefill_min_tokens: int = 256  # shorter uncached prompts are prefilled on the decode worker
    max_prefill_queue: int = 8            # prefills in flight per prefill worker before falling back
    policy: KVPolicyConfig = KVPolicyConfig()

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
    num_cached_tokens: int      # of the prompt, on the chosen decode worker
    num_uncached_tokens: int


@dataclass(slots=True)
class RoutedTotals:
    """What the router has routed since it started: the load the planner reads, per interval, as
    differences of these counts. A migrated request counts once per route."""
    num_requests: int = 0
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0   # found in the chosen decode worker's prefix cache
    # Per prompt-length class, keyed by the length's bit length (class k holds 2^(k-1) to
    # 2^k - 1 tokens): [requests, prompt tokens]. The planner sizes prefill over this mix.
    by_length_class: dict[int, list[int]] = field(default_factory=dict)

    def count(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        self.num_requests += 1
        self.num_prompt_tokens += num_prompt_tokens
        self.num_cached_prompt_tokens += num_cached_tokens
        counts = self.by_length_class.setdefault(num_prompt_tokens.bit_length(), [0, 0])
        counts[0] += 1
        counts[1] += num_prompt_tokens


class Router:
    def __init__(self, config: RoutingConfig, block_size: int):
        self.config = config
        self.block_size = block_size
        self.totals = RoutedTotals()
        self.indexes = {"decode": KVIndex(), "prefill": KVIndex()}
        self.loads = {"decode": ActiveLoadTracker(), "prefill": ActiveLoadTracker()}
        self.policies = {"decode": KVRouterPolicy(config.policy),
                         "prefill": KVRouterPolicy(config.policy)}
        self._prefill_of: dict[str, str] = {}  # request id -> its prefill worker
        # Blocks routed but maybe not yet reported: (role, worker) -> hash -> requests holding it.
        self._pending: dict[tuple[str, str], Counter[int]] = {}
        self._pending_of: dict[str, list[tuple[tuple[str, str], list[int]]]] = {}

    def route(self, request_id: str, num_prompt_tokens: int, block_hashes: list[int],
              decode_pool: list[WorkerState], prefill_pool: list[WorkerState]) -> RouteDecision:
        """Raises LookupError when no decode worker is ready."""
        if not decode_pool:
            raise LookupError("no decode worker is ready")
        num_blocks = -(-num_prompt_tokens // self.block_size)
        decode = self._choose("decode", decode_pool, num_blocks, block_hashes)
        cached = min(decode.overlap_blocks * self.block_size, num_prompt_tokens)
        uncached = num_prompt_tokens - cached
        self.totals.count(num_prompt_tokens, cached)
        prefill = None
        if uncached >= self.config.remote_prefill_min_tokens:
            open_pool = [w for w in prefill_pool if self.num_inflight("prefill", w.worker_id)
                         < self.config.max_prefill_queue]
            if open_pool:
                prefill = self._choose("prefill", open_pool, num_blocks, block_hashes)
        self._add_pending(request_id, "decode", decode.worker_id, block_hashes)
        if prefill is not None:
            self._add_pending(request_id, "prefill", prefill.worker_id, block_hashes)
        uncached_blocks = num_blocks - min(decode.overlap_blocks, num_blocks)
        self.loads["decode"].on_routed(request_id, decode.worker_id, num_blocks,
                                       0 if prefill else uncached_blocks)
        if prefill is not None:
            self.loads["prefill"].on_routed(request_id, prefill.worker_id, num_blocks,
                                            num_blocks - min(prefill.overlap_blocks, num_blocks))
            self._prefill_of[request_id] = prefill.worker_id
        return RouteDecision(decode.worker_id, prefill.worker_id if prefill else None, cached,
                             uncached)

    def on_first_token(self, request_id: str) -> None:
        self.loads["decode"].on_first_token(request_id)
        if self._prefill_of.pop(request_id, None) is not None:
            self.loads["prefill"].on_finished(request_id)

    def on_finished(self, request_id: str) -> None:
        """The request ended, however it ended; safe to call more than once."""
        for key, hashes in self._pending_of.pop(request_id, []):
            pending = self._pending[key]
            _release_chain(pending, hashes)
            if not pending:
                del self._pending[key]
        self.loads["decode"].on_finished(request_id)
        if self._prefill_of.pop(request_id, None) is not None:
            self.loads["prefill"].on_finished(request_id)

    def num_inflight(self, role: str, worker_id: str) -> int:
        """Requests routed to this worker in this role and not yet done there (prefill: until the
        first token)."""
        return self.loads[role].num_requests(worker_id)

    @property
    def num_active_requests(self) -> int:
        """Requests routed and not yet finished, across the deployment."""
        return self.loads["decode"].num_active_requests()

    def on_worker_stats(self, worker: WorkerState) -> None:
        stats = worker.stats
        if stats.num_blocks:
            self.loads[worker.role].correct(worker.worker_id,
                                            stats.num_blocks - stats.num_free_blocks)

    def remove_worker(self, worker_id: str, role: str) -> None:
        self.loads[role].remove_worker(worker_id)

    def _add_pending(self, request_id: str, role: str, worker_id: str,
                     block_hashes: list[int]) -> None:
        if not block_hashes:
            return
        key = (role, worker_id)
        pending = self._pending.setdefault(key, Counter())
        # Whole chains: the hashes already pending are a leading run and the rest are new, so
        # only the run is counted up one by one and the new tail goes in with one dict update
        # (Counter.update gets and sets every hash).
        num_held = _leading_run(block_hashes, pending)
        for block_hash in block_hashes[:num_held]:
            pending[block_hash] += 1
        dict.update(pending, zip(block_hashes[num_held:], repeat(1)))
        self._pending_of.setdefault(request_id, []).append((key, block_hashes))

    def _choose(self, role: str, pool: list[WorkerState], num_blocks: int,
                block_hashes: list[int]):
        candidates = [w.worker_id for w in pool]
        tracker = self.loads[role]
        overlaps = dict(self.indexes[role].overlaps(block_hashes))
        for worker_id in candidates:
            pending = self._pending.get((role, worker_id))
            if pending:
                # Pending hashes are whole chains (each routed prompt's), so the prompt's
                # pending blocks are a leading run: bisect instead of walking hundreds.
                held = _leading_run(block_hashes, pending)
                overlaps[worker_id] = max(overlaps.get(worker_id, 0), held)
        loads = {w: tracker.load(w) for w in candidates}
        return self.policies[role].choose(candidates, num_blocks, overlaps, loads)


def _release_chain(pending: Counter[int], hashes: list[int]) -> None:
    """Drop one count of each hash of a chain routed earlier. Counts never rise along a chain
    (whoever holds block k holds blocks 0..k-1), so the hashes this chain alone holds are a
    tail, found by bisection and popped in one C-level pass; only the shared head is counted
    down hash by hash (Counter.subtract is a Python loop, and a long prompt has hundreds)."""
    num_shared = bisect_left(range(len(hashes)), True, key=lambda k: pending[hashes[k]] <= 1)
    for block_hash in hashes[:num_shared]:
        pending[block_hash] -= 1
    deque(map(pending.pop, hashes[num_shared:]), maxlen=0)  # dict.pop: Counter's del is Python


def _leading_run(block_hashes: list[int], held: Counter[int]) -> int:
    """How many leading hashes `held` has, for a `held` made of whole chains."""
    return bisect_left(range(len(block_hashes)), True, key=lambda k: block_hashes[k] not in held)
