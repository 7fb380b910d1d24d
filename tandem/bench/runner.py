"""Drives a client through a request list on an arrival schedule; the only place that waits.

Each request gets a task that sleeps until its arrival offset, then waits for the previous turn of
its session (if any) to finish, then takes a concurrency slot and sends. A request waiting for its
session does not hold a slot, so sessions cannot starve the cap. The run's duration is measured
from the start of the schedule to the last response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

from tqdm import tqdm

from tandem.bench.arrivals import session_predecessors
from tandem.bench.clients import BenchClient
from tandem.bench.records import BenchRequest, RequestRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchRun:
    records: list[RequestRecord]  # in request order
    duration_s: float
    started_at_epoch_s: float = 0.0   # wall clock when the schedule began (start_s is from it)


async def run_benchmark(client: BenchClient, requests: Sequence[BenchRequest],
                        offsets_s: Sequence[float], max_concurrency: int | None = None,
                        show_progress: bool = True) -> BenchRun:
    if len(offsets_s) != len(requests):
        raise ValueError("one arrival offset per request is needed")
    if max_concurrency is not None and max_concurrency <= 0:
        raise ValueError(f"--max-concurrency must be positive, got {max_concurrency}")
    predecessors = session_predecessors(requests)
    finished = [asyncio.Event() for _ in requests]
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    progress = tqdm(total=len(requests), disable=not show_progress, unit="req")
    records: list[RequestRecord | None] = [None] * len(requests)
    start_s, started_at_epoch_s = time.perf_counter(), time.time()

    async def one(index: int) -> None:
        try:
            await asyncio.sleep(max(0.0, start_s + offsets_s[index] - time.perf_counter()))
            previous = predecessors[index]
            if previous is not None:
                await finished[previous].wait()
            async with slots if slots is not None else nullcontext():
                records[index] = await client.send(requests[index], index, start_s)
        except Exception as err:  # a client bug must not hang the sessions waiting on us
            logger.exception("request %d crashed", index)
            now_s = time.perf_counter()
            records[index] = RequestRecord(
                request_index=index, start_s=now_s - start_s, ttft_ms=None, itl_ms=(),
                e2e_ms=0.0, prompt_tokens=requests[index].prompt_len, cached_tokens=0,
                output_tokens=0, error=f"{type(err).__name__}: {err}")
        finally:
            finished[index].set()
            progress.update(1)

    try:
        await asyncio.gather(*(one(i) for i in range(len(requests))))
    finally:
        progress.close()
    duration_s = time.perf_counter() - start_s
    done = [record for record in records if record is not None]
    assert len(done) == len(requests), "every task stores a record"
    logger.info("%d requests in %.2f s", len(done), duration_s)
    return BenchRun(records=done, duration_s=duration_s, started_at_epoch_s=started_at_epoch_s)
