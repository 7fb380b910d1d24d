"""The bench client's own garbage-collection pauses.

While the client's collector runs, no stream is read: the pause shows up as an inter-token gap in
every request in flight, whatever the server did. A full collection walks every tracked object,
and a client holds its whole dataset (a trace's prompts are millions of token ids) next to
transformers' modules. `ClientPauses` collects once before the run and freezes what is alive
(gc.freeze), so collections during the run walk only what the run creates, and it records every
collection that still takes longer than `LONG_PAUSE_S`, so a run can say whether its gaps are
partly its own.
"""

from __future__ import annotations

import gc
import time

LONG_PAUSE_S = 0.01


class ClientPauses:
    def __init__(self) -> None:
        self.long_pauses_s: list[float] = []
        self._started_s = 0.0

    def __enter__(self) -> ClientPauses:
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *exc_info) -> None:
        gc.callbacks.remove(self._on_collection)
        gc.unfreeze()

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started_s = time.perf_counter()
            return
        took_s = time.perf_counter() - self._started_s
        if took_s > LONG_PAUSE_S:
            self.long_pauses_s.append(took_s)

    def describe(self) -> str:
        """One line for the report; empty when no collection paused the client for long."""
        if not self.long_pauses_s:
            return ""
        return (f"client: {len(self.long_pauses_s)} garbage collections over "
                f"{LONG_PAUSE_S * 1e3:.0f} ms during the run (longest "
                f"{max(self.long_pauses_s) * 1e3:.1f} ms); each is a gap in every stream in flight")
