"""The engine's per-request streams: updates that queue while the reader is busy go out as one."""

from __future__ import annotations

import asyncio

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.llm_engine import SequenceUpdate
from tandem.engine.sequence import FinishReason


def update(tokens: list[int], finished: bool = False, queue_s: float | None = None
           ) -> SequenceUpdate:
    return SequenceUpdate("r", tokens, [], finished, FinishReason.LENGTH if finished else None,
                          None, 5, 0, queue_s)


def test_queued_updates_reach_a_slow_reader_as_one():
    async def main():
        engine = AsyncEngine(engine=None)
        stream = engine.open_stream("r")
        stream.put_nowait(update([1], queue_s=0.25))
        stream.put_nowait(update([2]))
        got = []
        async for item in engine.iterate("r", stream):
            got.append(item)
            if len(got) == 1:  # the reader was busy: three more steps' tokens queued
                for item in (update([3]), update([4]), update([5], finished=True)):
                    stream.put_nowait(item)
        return got

    got = asyncio.run(main())
    assert [u.new_token_ids for u in got] == [[1, 2], [3, 4, 5]]
    assert got[0].queue_time_s == 0.25 and not got[0].finished
    assert got[1].finished and got[1].finish_reason == FinishReason.LENGTH


def test_an_engine_failure_after_queued_updates_still_ends_the_stream():
    async def main():
        engine = AsyncEngine(engine=None)
        stream = engine.open_stream("r")
        stream.put_nowait(update([1]))
        stream.put_nowait(RuntimeError("device lost"))
        got = []
        try:
            async for item in engine.iterate("r", stream):
                got.append(item.new_token_ids)
        except Exception as err:  # EngineDead
            return got, str(err)
        return got, None

    got, error = asyncio.run(main())
    assert got == [[1]] and "device lost" in error


def test_slow_gaps_between_a_requests_steps_are_logged_once_a_second(monkeypatch, caplog):
    import logging

    from tandem.engine import async_engine
    from tandem.engine.async_engine import SlowGapLog
    from tandem.engine.llm_engine import SequenceUpdate

    def update(request_id: str) -> SequenceUpdate:
        return SequenceUpdate(request_id, [7], [], False, None, None, 4, 0)

    clock = iter([10.0, 10.005, 10.060, 10.065, 10.100, 11.5, 11.6])
    monkeypatch.setattr(async_engine.time, "perf_counter", lambda: next(clock))
    gaps = SlowGapLog()
    with caplog.at_level(logging.INFO, logger=async_engine.__name__):
        gaps.step([update("a")])
        gaps.step([update("a")])                 # 5 ms
        gaps.step([update("a"), update("b")])    # 55 ms: logged
        gaps.step([update("c")])                 # 5 ms, and no request in both
        gaps.step([update("c")])                 # 35 ms, within the second: counted, not logged
        gaps.step([update("d")])                 # 1.4 s, but "d" had no token before: no gap
        gaps.step([update("d")])                 # 100 ms, a second after the line: logged
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "slow inter-token gap: 55.0 ms between steps; the later step gave tokens to 2 requests, "
        "1 of them not in the step before (1 such gaps since the last line)",
        "slow inter-token gap: 100.0 ms between steps; the later step gave tokens to 1 requests, "
        "0 of them not in the step before (2 such gaps since the last line)"]
