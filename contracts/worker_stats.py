"""What a worker tells the frontend about itself: once when it registers, then in every heartbeat."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Registration:
    worker_id: str
    role: str          # prefill | decode
    address: str       # host:port of its Worker service
    block_size: int    # tokens per KV block
    model: str
    num_blocks: int    # KV blocks of its cache


@dataclass(frozen=True, slots=True)
class WorkerStats:
    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0   # prompt tokens looked up
    prefix_cache_hits: int = 0      # of which found cached
    num_pinned_requests: int = 0    # prefill role: finished requests whose blocks await a pull
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0
    kv_warm_reads: int = 0          # one-block reads made to keep paths to prefill workers hot
    num_preemptions: int = 0        # requests preempted (and recomputed) to free KV blocks

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, 0 before the first report."""
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0
