"""A periodic stats line per worker, as vLLM prints one per engine:

    worker decode-0 (decode): prompt throughput 812.4 tokens/s, generation throughput 96.0 tokens/s,
    running 4 reqs, waiting 0 reqs, KV cache usage 12.5%, prefix cache hit rate 40.2%

Throughputs are the tokens of the requests each worker finished in the interval (request_metrics
counts them); running, waiting, KV usage and the prefix cache hit rate (since the start) come from
the worker's latest heartbeat. An idle worker is not logged again until something changes. The
interval is 10 s, as vLLM's; TANDEM_LOG_STATS_INTERVAL_S sets another (0 turns the lines off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from tandem.frontend.request_metrics import RequestRecorder
from tandem.router.worker_registry import WorkerRegistry

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0


class WorkerStatsLog:
    def __init__(self, workers: WorkerRegistry, recorder: RequestRecorder,
                 interval_s: float | None = None):
        self.workers = workers
        self.recorder = recorder
        self.interval_s = (interval_s if interval_s is not None else
                           float(os.environ.get("TANDEM_LOG_STATS_INTERVAL_S",
                                                DEFAULT_INTERVAL_S)))
        self.task: asyncio.Task | None = None
        self._last_tokens: dict[tuple[str, str], tuple[int, int]] = {}
        self._last_idle: set[str] = set()
        self._last_s = time.monotonic()

    def start(self) -> None:
        if self.interval_s > 0:
            self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.log_once(time.monotonic())

    def log_once(self, now_s: float) -> list[str]:
        """Log (and return) one line per worker that is busy or was busy in the interval."""
        elapsed_s = max(now_s - self._last_s, 1e-9)
        self._last_s = now_s
        lines = []
        for w in list(self.workers.workers.values()):
            key = (w.worker_id, w.role)
            prompt, generated = self.recorder.tokens_by_worker.get(key, [0, 0])
            last_prompt, last_generated = self._last_tokens.get(key, (0, 0))
            self._last_tokens[key] = (prompt, generated)
            s = w.stats
            is_idle = (prompt, generated) == (last_prompt, last_generated) and not (
                s.num_running or s.num_waiting)
            if is_idle and w.worker_id in self._last_idle:
                continue
            self._last_idle.discard(w.worker_id)
            if is_idle:
                self._last_idle.add(w.worker_id)
            hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0
            lines.append(
                f"worker {w.worker_id} ({w.role}): prompt throughput "
                f"{(prompt - last_prompt) / elapsed_s:.1f} tokens/s, generation throughput "
                f"{(generated - last_generated) / elapsed_s:.1f} tokens/s, running "
                f"{s.num_running} reqs, waiting {s.num_waiting} reqs, KV cache usage "
                f"{100 * s.kv_usage:.1f}%, prefix cache hit rate {100 * hit_rate:.1f}%")
        for line in lines:
            logger.info("%s", line)
        return lines
