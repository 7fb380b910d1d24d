"""Serving processes keep start-up's objects out of garbage collections and log long ones."""

from __future__ import annotations

import gc
import logging

from tandem.launcher import gc_pauses


def test_startup_objects_are_frozen_and_long_collections_logged(monkeypatch, caplog):
    monkeypatch.setattr(gc, "callbacks", [])
    try:
        gc_pauses.freeze_startup_heap()
        assert gc.get_freeze_count() > 1000   # this interpreter's modules, at the least
        # A full collection now walks only what was created since: far fewer objects.
        tracked = len(gc.get_objects())
        assert tracked < gc.get_freeze_count() / 2
        gc_pauses.freeze_startup_heap()
        assert gc.callbacks == [gc_pauses._on_collection]   # registered once
    finally:
        gc.unfreeze()
    clock = iter([10.0, 10.05])
    monkeypatch.setattr(gc_pauses.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.WARNING, logger=gc_pauses.__name__):
        gc_pauses._on_collection("start", {"generation": 2})
        gc_pauses._on_collection("stop", {"generation": 2, "collected": 7})
    assert "generation 2 took 50.0 ms (7 objects collected)" in caplog.text


def test_short_collections_are_not_logged(monkeypatch, caplog):
    clock = iter([10.0, 10.001])
    monkeypatch.setattr(gc_pauses.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.WARNING, logger=gc_pauses.__name__):
        gc_pauses._on_collection("start", {"generation": 0})
        gc_pauses._on_collection("stop", {"generation": 0, "collected": 0})
    assert caplog.text == ""
