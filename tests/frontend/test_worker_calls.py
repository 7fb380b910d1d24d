"""The idle deadline of a worker's token stream: one timer per call, counting only the waits."""

from __future__ import annotations

import asyncio

from tandem.frontend.worker_calls import _Tracked


class _Call:
    def __init__(self) -> None:
        self.num_cancels = 0

    def cancel(self) -> None:
        self.num_cancels += 1


def _run(coroutine):
    return asyncio.run(coroutine)


def test_a_wait_past_its_deadline_ends_the_call():
    async def scenario():
        tracked = _Tracked(_Call(), "w:1")
        tracked.arm(0.05)
        await asyncio.sleep(0.1)
        return tracked

    tracked = _run(scenario())
    assert tracked.ended_as == "DEADLINE_EXCEEDED" and tracked.call.num_cancels == 1
    assert tracked.detail == "no message for 0 s"


def test_time_between_waits_does_not_count_and_messages_keep_one_timer():
    async def scenario():
        tracked = _Tracked(_Call(), "w:1")
        tracked.arm(0.08)
        for _ in range(5):   # messages every 0.03 s: each wait is short
            await asyncio.sleep(0.03)
            tracked.disarm()
            tracked.arm(0.08)
        tracked.disarm()
        await asyncio.sleep(0.2)   # the caller is busy, not waiting: no deadline runs
        assert tracked.ended_as is None
        tracked.arm(0.08)
        await asyncio.sleep(0.04)
        assert tracked.ended_as is None
        await asyncio.sleep(0.08)
        assert tracked.ended_as == "DEADLINE_EXCEEDED"
        tracked.stop()

    _run(scenario())


def test_a_shorter_deadline_brings_the_timer_on():
    async def scenario():
        tracked = _Tracked(_Call(), "w:1")
        tracked.arm(10.0)   # the first message's long deadline
        tracked.disarm()
        tracked.arm(0.05)
        await asyncio.sleep(0.1)
        return tracked

    assert _run(scenario()).ended_as == "DEADLINE_EXCEEDED"


def test_stop_cancels_the_timer():
    async def scenario():
        tracked = _Tracked(_Call(), "w:1")
        tracked.arm(0.05)
        tracked.stop()
        await asyncio.sleep(0.1)
        return tracked

    tracked = _run(scenario())
    assert tracked.ended_as is None and tracked.timer is None
