"""PullWarmer: keep a decode worker's path to a prefill worker hot while a pull from it is due.

A pull that comes after milliseconds without traffic to its peer starts slowly (measured on 2x
H200, kv_transfer/nixl_connector.py): a 1k-token pull after a 50 ms pause took 646 us, and
378-402 us when one-block reads had gone the same way every millisecond before it. A prompt's
prefill is exactly such a pause. So the frontend tells the decode worker, as it sends the prompt to
a prefill worker, that a pull from there will follow (`ExpectPull`); until the pull starts, or
`horizon_s` passes, the warmer has the agent read one block from that peer every `interval_s`.

The cost, only while some pull is expected: one small READ per expected prefill worker per
interval (a 2 MiB block for Llama-3.1-8B shapes, about 0.5% of NVLink's bandwidth) and the tens of
microseconds of the decode worker's time it takes to post it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

WARM_INTERVAL_S = 0.001    # a read every 1 ms kept the path hot; every 5 ms only partly
EXPECT_HORIZON_S = 2.0     # a pull that has not started by then is no longer waited for


class PullWarmer:
    """Which peers a pull is expected from (pure bookkeeping), and the loop that warms them."""

    def __init__(self, warm: Callable[[str], object], *, interval_s: float = WARM_INTERVAL_S,
                 horizon_s: float = EXPECT_HORIZON_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`warm(peer)` posts one warming read (NixlKVAgent.warm); it may raise."""
        self._warm = warm
        self.interval_s = interval_s
        self.horizon_s = horizon_s
        self._clock = clock
        self._expected: dict[str, tuple[str, float]] = {}  # request id -> (peer, deadline)
        self._task: asyncio.Task | None = None

    def expect(self, request_id: str, peer: str) -> None:
        """A pull of `request_id`'s KV from `peer` will follow; warm the path until it starts."""
        self._expected[request_id] = (peer, self._clock() + self.horizon_s)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pull-warmer")

    def forget(self, request_id: str) -> None:
        """The pull started (or will not happen); unknown ids are ignored."""
        self._expected.pop(request_id, None)

    def peers(self) -> list[str]:
        """The peers to warm now, after dropping expectations past their horizon."""
        now = self._clock()
        for request_id, (_, deadline) in list(self._expected.items()):
            if deadline <= now:
                del self._expected[request_id]
        return sorted({peer for peer, _ in self._expected.values()})

    def _forget_peer(self, peer: str) -> None:
        for request_id, (expected_peer, _) in list(self._expected.items()):
            if expected_peer == peer:
                del self._expected[request_id]

    async def _run(self) -> None:
        while peers := self.peers():
            for peer in peers:
                try:
                    self._warm(peer)
                except Exception as err:  # the pull itself will meet the problem and handle it
                    logger.info("stopped warming the path to %s: %s", peer, err)
                    self._forget_peer(peer)
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        self._expected.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
