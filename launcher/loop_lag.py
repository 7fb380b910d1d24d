"""How long a serving process's event loop goes without running: every stream it relays waits as
long. A task wakes every CHECK_INTERVAL_S and logs each wake-up that came more than LAG_WARNING_S
late (a long callback, a collection, the GIL held by another thread), so a stall that clients see
as an inter-token gap can be found in the log of the process that made it. At most one line a
second; the stalls in between are counted into the next line."""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.05
LAG_WARNING_S = 0.02
LOG_EVERY_S = 1.0


async def watch_loop_lag(process: str) -> None:
    """Runs until cancelled."""
    loop = asyncio.get_running_loop()
    logged_s, unlogged, longest_s = -LOG_EVERY_S, 0, 0.0
    while True:
        started_s = loop.time()
        await asyncio.sleep(CHECK_INTERVAL_S)
        now_s = loop.time()
        lag_s = now_s - started_s - CHECK_INTERVAL_S
        if lag_s <= LAG_WARNING_S:
            continue
        unlogged, longest_s = unlogged + 1, max(longest_s, lag_s)
        if now_s - logged_s >= LOG_EVERY_S:
            logger.warning("%s: event loop blocked for %.1f ms (%d stalls over %.0f ms since the "
                           "last line, longest %.1f ms)", process, lag_s * 1e3, unlogged,
                           LAG_WARNING_S * 1e3, longest_s * 1e3)
            logged_s, unlogged, longest_s = now_s, 0, 0.0
