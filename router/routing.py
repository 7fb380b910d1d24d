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
from dataclasses import dataclass, field

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
    def __init__(self, config: RoutingConfig, block_size: int,
                 indexes: dict[str, KVIndex] | None = None):
        """`indexes`: the KV index of each pool, "decode" and "prefill" (by default new ones)."""
        self.config = config
        self.block_size = block_size
        self.totals = RoutedTotals()
        self.indexes = indexes if indexes is not None else {"decode": KVIndex(),
                                                            "prefill": KVIndex()}
        self.loads = {"decode": ActiveLoadTracker(), "prefill": ActiveLoadTracker()}
        self.policies = {"decode": KVRouterPolicy(config.policy),
                         "prefill": KVRouterPolicy(config.policy)}
        self._prefill_of: dict[str, str] = {}  # request id -> its prefill worker
        # Prompts routed but maybe not yet reported, as whole chains: (role, worker) -> first
        # hash -> the chains starting with it. A chain is kept by reference, not hash by hash:
        # adding and dropping a 750-block prompt cost a dict insertion and deletion per block.
        self._pending: dict[tuple[str, str], dict[int, list[list[int]]]] = {}
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
            chains = pending[hashes[0]]
            del chains[next(i for i, chain in enumerate(chains) if chain is hashes)]
            if not chains:
                del pending[hashes[0]]
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
        self._pending.setdefault(key, {}).setdefault(block_hashes[0], []).append(block_hashes)
        self._pending_of.setdefault(request_id, []).append((key, block_hashes))

    def _choose(self, role: str, pool: list[WorkerState], num_blocks: int,
                block_hashes: list[int]):
        candidates = [w.worker_id for w in pool]
        tracker = self.loads[role]
        overlaps = dict(self.indexes[role].overlaps(block_hashes))
        for worker_id in candidates if block_hashes else ():
            chains = self._pending.get((role, worker_id), {}).get(block_hashes[0])
            if chains:
                # Chained hashes: a prompt holds a pending chain's block k only with blocks
                # 0..k-1, so what is pending of it is its longest agreement with one chain.
                held = max(_agreeing_length(chain, block_hashes) for chain in chains)
                overlaps[worker_id] = max(overlaps.get(worker_id, 0), held)
        loads = {w: tracker.load(w) for w in candidates}
        return self.policies[role].choose(candidates, num_blocks, overlaps, loads)


def _agreeing_length(chain: list[int], block_hashes: list[int]) -> int:
    """How many leading hashes two chains share (equal at k means equal before k)."""
    n = min(len(chain), len(block_hashes))
    if chain[n - 1] == block_hashes[n - 1]:
        return n
    return bisect_left(range(n), True, key=lambda k: chain[k] != block_hashes[k])
