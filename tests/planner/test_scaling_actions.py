"""Turning pool targets into actions: flips, adds and removals, on hand-built observations."""

from __future__ import annotations

from tandem.planner.observation import AddWorker, FlipRole, Observation, WorkerView
from tandem.planner.scaling_actions import ActionLimits, choose_actions


def observation(*workers: tuple[str, str]) -> Observation:
    return Observation(0.0, 60.0, workers=tuple(WorkerView(wid, role) for wid, role in workers))


def limits(flip_floor: dict[str, int], may_shrink: frozenset[str] = frozenset()) -> ActionLimits:
    return ActionLimits(max_changes=4, max_workers=8, may_shrink=may_shrink,
                        flip_floor=flip_floor)


def test_a_growing_pool_never_flips_its_ready_worker_away():
    """Both pools grow: the prefill pool's count includes the worker it just asked for, but its
    one ready worker must stay, or prefill has no worker for a whole cold start."""
    obs = observation(("p0", "prefill"), ("d0", "decode"))
    current = {"prefill": 1, "decode": 1, "both": 0}
    actions, after = choose_actions(obs, current, {"prefill": 2, "decode": 2, "both": 0}, [],
                                    set(), limits(dict(current)))
    assert actions == [AddWorker("prefill"), AddWorker("decode")]
    assert after == {"prefill": 2, "decode": 2, "both": 0}


def test_a_pool_with_spare_capacity_flips_a_worker_to_a_growing_one():
    obs = observation(("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"))
    current = {"prefill": 2, "decode": 1, "both": 0}
    floor = {"prefill": 1, "decode": 1, "both": 0}     # prefill's margin-sized target is 1
    actions, after = choose_actions(obs, current, {"prefill": 2, "decode": 2, "both": 0}, [],
                                    set(), limits(floor))
    assert actions == [FlipRole("p0", "decode")]
    assert after == {"prefill": 1, "decode": 2, "both": 0}
