"""The bench client keeps its dataset out of garbage collections and counts long ones."""

from __future__ import annotations

import gc

from tandem.bench import client_pauses
from tandem.bench.client_pauses import ClientPauses


def test_the_dataset_is_frozen_during_the_run_and_long_collections_are_counted(monkeypatch):
    prompts = [tuple(range(i, i + 64)) for i in range(2000)]
    with ClientPauses() as pauses:
        assert gc.get_freeze_count() > len(prompts)
        clock = iter([5.0, 5.03, 6.0, 6.002])
        monkeypatch.setattr(client_pauses.time, "perf_counter", lambda: next(clock))
        for generation, collected in ((2, 10), (0, 0)):
            pauses._on_collection("start", {"generation": generation})
            pauses._on_collection("stop", {"generation": generation, "collected": collected})
    assert gc.get_freeze_count() == 0 and pauses._on_collection not in gc.callbacks
    assert [round(s, 3) for s in pauses.long_pauses_s] == [0.03]
    assert "1 garbage collections over 10 ms during the run (longest 30.0 ms)" in pauses.describe()
    assert ClientPauses().describe() == ""
