"""A serving process logs the stalls of its event loop, at most a line a second."""

from __future__ import annotations

import asyncio
import logging
import time

from tandem.launcher import loop_lag


def test_a_blocked_loop_is_logged_with_its_length(caplog):
    async def main():
        watch = asyncio.create_task(loop_lag.watch_loop_lag("frontend"))
        await asyncio.sleep(0.01)          # the watch is asleep
        time.sleep(0.12)                   # a callback that holds the loop
        await asyncio.sleep(0.1)
        watch.cancel()

    with caplog.at_level(logging.WARNING, logger=loop_lag.__name__):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("frontend: event loop blocked for ")
    blocked_ms = float(lines[0].split("blocked for ")[1].split(" ms")[0])
    assert 60 <= blocked_ms <= 400
