"""PullWarmer: which peers are warmed, for how long, and what a failing warm-up does."""

from __future__ import annotations

import asyncio

from tandem.decode_workers.pull_warmer import PullWarmer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_peers_follow_expectations_and_their_horizon() -> None:
    async def scenario() -> None:
        clock = Clock()
        warmer = PullWarmer(lambda peer: None, interval_s=60, horizon_s=2.0, clock=clock)
        warmer.expect("a", "prefill-1")
        clock.now += 1.0
        warmer.expect("b", "prefill-0")
        clock.now += 0.5
        warmer.expect("c", "prefill-1")
        assert warmer.peers() == ["prefill-0", "prefill-1"]
        clock.now += 0.6  # a is past its horizon; c still expects prefill-1
        assert warmer.peers() == ["prefill-0", "prefill-1"]
        warmer.forget("c")
        warmer.forget("unknown")
        assert warmer.peers() == ["prefill-0"]
        clock.now += 1.0  # b too
        assert warmer.peers() == []
        await warmer.close()

    asyncio.run(scenario())


def test_warms_each_expected_peer_until_the_pull_starts() -> None:
    async def scenario() -> tuple[list[str], list[str], bool]:
        warmed: list[str] = []
        warmer = PullWarmer(warmed.append, interval_s=0.001)
        warmer.expect("req-1", "prefill-0")
        warmer.expect("req-2", "prefill-0")  # one read per peer and interval, not per request
        warmer.expect("req-3", "prefill-1")
        await asyncio.sleep(0.05)
        warmer.forget("req-1")
        warmer.forget("req-3")
        await asyncio.sleep(0.02)
        during = list(warmed)
        warmer.forget("req-2")
        await asyncio.sleep(0.02)  # the loop sees nothing expected and ends
        ended = warmer._task.done()
        after = list(warmed)
        await warmer.close()
        return during, after, ended

    during, after, ended = asyncio.run(scenario())
    assert during.count("prefill-0") >= 5 and during.count("prefill-1") >= 5
    assert during[-3:] == ["prefill-0"] * 3  # prefill-1 stopped when req-3's pull started
    assert ended and len(after) <= len(during) + 1


def test_a_failing_peer_is_dropped_and_the_others_kept() -> None:
    async def scenario() -> list[str]:
        warmed: list[str] = []

        def warm(peer: str) -> None:
            if peer == "gone":
                raise RuntimeError("peer went away")
            warmed.append(peer)

        warmer = PullWarmer(warm, interval_s=0.001)
        warmer.expect("req-1", "gone")
        warmer.expect("req-2", "prefill-0")
        await asyncio.sleep(0.02)
        peers = warmer.peers()
        await warmer.close()
        assert warmer.peers() == []
        return peers + warmed

    result = asyncio.run(scenario())
    assert result[0] == "prefill-0" and "gone" not in result and len(result) > 3


def test_the_loop_ends_at_the_horizon() -> None:
    async def scenario() -> bool:
        warmer = PullWarmer(lambda peer: None, interval_s=0.001, horizon_s=0.01)
        warmer.expect("req-1", "prefill-0")
        await asyncio.sleep(0.06)
        return warmer._task.done()

    assert asyncio.run(scenario())
