"""What a simulated request observed, as `tandem bench` records it, and the run's summary.

A simulated request keeps the times its tokens reached the client; at the end each becomes a
`tandem.bench.records.RequestRecord` built by the same rules as bench's stream recorder (TTFT to the
first token, one inter-token gap per streamed token, E2E to the last), so
`tandem.bench.metrics.summarize` gives the same JSON keys and `tandem bench --compare real.json
sim.json` lines the two up. Every streamed chunk carries one token, as tandem's workers send them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tandem.bench.metrics import ideal_prefix_hit_rate_of_hashes, summarize
from tandem.contracts.block_hash import hash_prompt_blocks
from tandem.bench.records import BenchRequest, RequestRecord

logger = logging.getLogger(__name__)


class SimRequest:
    """One request's progress through the simulation."""

    __slots__ = ("index", "request_id", "bench", "offset_s", "send_s", "block_hashes", "seq",
                 "decode_worker", "prefill_worker", "token_times_s", "first_token_s",
                 "cached_tokens",
                 "kv_transfer_bytes", "done", "error")

    def __init__(self, index: int, bench: BenchRequest, offset_s: float):
        self.index = index
        self.request_id = str(index)
        self.bench = bench
        self.offset_s = offset_s
        self.send_s: float | None = None
        self.block_hashes: list[int] = []
        self.seq = None
        self.decode_worker = None
        self.prefill_worker = None
        # When its tokens reached the client (through the frontend, when it is modelled).
        self.token_times_s: list[float] = []
        self.first_token_s: float | None = None  # when its first token reached the frontend
        self.cached_tokens = 0
        self.kv_transfer_bytes = 0
        self.done = False
        self.error: str | None = None

    def to_record(self, keep_chunks: bool = False) -> RequestRecord:
        times = self.token_times_s
        send_s = self.send_s if self.send_s is not None else self.offset_s
        error = self.error
        if error is None and not times:
            error = "the simulation ended before the request produced a token"
        ms = 1e3
        return RequestRecord(
            request_index=self.index, start_s=send_s,
            ttft_ms=(times[0] - send_s) * ms if times else None,
            # A list comprehension, not a generator: a fifth less over a trace's millions of gaps.
            itl_ms=tuple([(b - a) * ms for a, b in zip(times, times[1:])]),
            e2e_ms=(times[-1] - send_s) * ms if times else 0.0,
            prompt_tokens=self.bench.prompt_len, cached_tokens=self.cached_tokens,
            output_tokens=len(times),
            chunk_times_s=tuple(times) if keep_chunks else (),
            chunk_tokens=(1,) * len(times) if keep_chunks else (),
            error=error)


@dataclass
class SimResult:
    requests: list[SimRequest]
    simulator: object        # the Simulator, for its workers and router after the run
    wall_s: float            # how long the simulation took, not simulated time

    def records(self, keep_chunks: bool = False) -> list[RequestRecord]:
        return [request.to_record(keep_chunks) for request in self.requests]

    @property
    def duration_s(self) -> float:
        """Simulated time from the first send to the last token, as bench measures a run."""
        return max((r.token_times_s[-1] for r in self.requests if r.token_times_s), default=0.0)

    def summary(self, slo: dict[str, float], records: list[RequestRecord] | None = None) -> dict:
        """`tandem bench`'s summary dict for this run (same keys)."""
        records = records if records is not None else self.records()
        sent = sorted(self.requests, key=lambda r: (r.send_s if r.send_s is not None
                                                    else r.offset_s, r.index))
        block_size = self.simulator.config.block_size
        ideal = ideal_prefix_hit_rate_of_hashes(
            ((r.block_hashes if r.block_hashes or r.bench.prompt_len < block_size
              else hash_prompt_blocks(r.bench.prompt_token_ids, block_size), r.bench.prompt_len)
             for r in sent), block_size)
        return summarize(records, self.duration_s, slo, ideal).to_json_dict()

    def stats(self) -> dict:
        """What the simulator itself saw: per-worker steps, busy time, preemptions, transfers."""
        sim = self.simulator
        duration_s = self.duration_s or 1.0
        workers = {}
        for worker_id, worker in sim.workers.items():
            scheduler = worker.scheduler
            workers[worker_id] = {
                "role": worker.role, "num_steps": worker.num_steps,
                "busy_fraction": round(worker.busy_s / duration_s, 4),
                "num_preemptions": scheduler.num_preemptions,
                "prefix_cache_hit_rate": (scheduler.prefix_cache_hits
                                          / scheduler.prefix_cache_queries
                                          if scheduler.prefix_cache_queries else 0.0),
            }
        stats = {
            "wall_s": round(self.wall_s, 3),
            "num_steps": sum(w.num_steps for w in sim.workers.values()),
            "num_remote_prefills": sim.num_remote_prefills,
            "kv_transfer_bytes": sum(r.kv_transfer_bytes for r in self.requests),
            "leaked_workers": [w for w, worker in sim.workers.items() if not worker.is_drained()],
            "workers": workers,
        }
        if sim.frontend is not None:
            stats["frontend"] = {"num_tokens": sim.frontend.num_tokens,
                                 "busy_fraction": round(sim.frontend.busy_s / duration_s, 4)}
        return stats
