"""Worker liveness in the registry, a pure core: late heartbeats make a worker suspect (routed
nothing new, nothing ended), a much longer silence makes it dead, a heartbeat makes it routable
again, and a role whose every worker is late is still routed to."""

from __future__ import annotations

import pytest

from tandem.contracts.worker_stats import Registration, WorkerStats
from tandem.router.worker_registry import DEAD, LIVE, SUSPECT, WorkerRegistry, liveness


def registry_of(*worker_ids: str, suspect_after_s: float = 3.0,
                dead_after_s: float = 30.0) -> WorkerRegistry:
    registry = WorkerRegistry("m", 16, suspect_after_s, dead_after_s)
    for worker_id in worker_ids:
        role = worker_id.split("-")[0]
        registry.register(Registration(worker_id, role, f"{worker_id}:1", 16, "m", 100), 0.0)
    return registry


def pool_ids(registry: WorkerRegistry, role: str = "decode") -> list[str]:
    return [w.worker_id for w in registry.pool(role)]


@pytest.mark.parametrize("silence_s, verdict", [
    (0.0, LIVE), (3.0, LIVE), (3.01, SUSPECT), (29.9, SUSPECT), (30.0, SUSPECT), (30.01, DEAD)])
def test_liveness_thresholds(silence_s, verdict):
    assert liveness(silence_s, 3.0, 30.0) == verdict


def test_a_late_worker_is_not_routed_to_but_stays_registered_and_is_not_dead():
    registry = registry_of("decode-0", "decode-1")
    dropped = []
    registry.on_deregistered(lambda worker, reason: dropped.append(worker.worker_id))
    registry.heartbeat("decode-1", WorkerStats(), 4.0)

    assert registry.sweep(5.0) == []            # decode-0 silent 5 s: late, not dead
    assert pool_ids(registry) == ["decode-1"]
    assert registry.workers["decode-0"].is_suspect and not registry.workers["decode-1"].is_suspect
    assert registry.count("decode") == 2 and dropped == []


def test_a_heartbeat_makes_a_suspect_worker_routable_again():
    registry = registry_of("decode-0", "decode-1")
    registry.heartbeat("decode-1", WorkerStats(), 9.0)
    registry.sweep(10.0)
    assert pool_ids(registry) == ["decode-1"]

    assert registry.heartbeat("decode-0", WorkerStats(num_running=7), 10.5)

    assert pool_ids(registry) == ["decode-0", "decode-1"]
    assert not registry.workers["decode-0"].is_suspect
    assert registry.workers["decode-0"].stats.num_running == 7
    assert registry.sweep(11.0) == []


def test_a_worker_silent_past_the_dead_threshold_is_returned_for_dropping():
    registry = registry_of("decode-0", "decode-1", "prefill-0")
    for worker_id in ("decode-1", "prefill-0"):
        registry.heartbeat(worker_id, WorkerStats(), 29.0)

    assert registry.sweep(30.0) == []           # exactly 30 s: still only late
    assert registry.sweep(30.5) == ["decode-0"]
    reasons = []
    registry.on_deregistered(lambda worker, reason: reasons.append((worker.worker_id, reason)))
    registry.deregister("decode-0", "no heartbeat for 30 s")
    assert reasons == [("decode-0", "no heartbeat for 30 s")]
    assert pool_ids(registry) == ["decode-1"] and registry.count("decode") == 1
    assert not registry.heartbeat("decode-0", WorkerStats(), 31.0)  # it must register again


def test_when_every_worker_of_a_role_is_late_they_are_all_still_routed_to():
    registry = registry_of("decode-0", "decode-1", "prefill-0")
    registry.heartbeat("prefill-0", WorkerStats(), 7.0)

    assert registry.sweep(8.0) == []
    assert registry.workers["decode-0"].is_suspect and registry.workers["decode-1"].is_suspect
    assert pool_ids(registry) == ["decode-0", "decode-1"]   # a slow host is no outage
    assert pool_ids(registry, "prefill") == ["prefill-0"]


def test_a_draining_worker_is_not_routed_to_even_when_the_others_are_late():
    registry = registry_of("decode-0", "decode-1")
    registry.set_draining("decode-1")
    registry.heartbeat("decode-1", WorkerStats(), 7.0)
    registry.sweep(8.0)
    assert pool_ids(registry) == ["decode-0"]   # late, but the only one taking requests


def test_registering_again_clears_the_suspect_mark():
    registry = registry_of("decode-0", "decode-1")
    registry.heartbeat("decode-1", WorkerStats(), 4.0)
    registry.sweep(4.0)
    registry.register(Registration("decode-0", "decode", "decode-0:2", 16, "m", 100), 4.5)
    assert pool_ids(registry) == ["decode-0", "decode-1"]


@pytest.mark.parametrize("suspect_after_s, dead_after_s", [(0.0, 30.0), (5.0, 5.0), (9.0, 3.0)])
def test_thresholds_must_be_ordered(suspect_after_s, dead_after_s):
    with pytest.raises(ValueError, match="need 0 < suspect_after_s < dead_after_s"):
        WorkerRegistry("m", 16, suspect_after_s, dead_after_s)
