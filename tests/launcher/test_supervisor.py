"""launcher/supervisor.py: restart backoff and the pool status /health reports."""

from __future__ import annotations

import pytest

from tandem.launcher.supervisor import RestartPolicy, Supervisor, describe_exit


def supervisor() -> Supervisor:
    s = Supervisor(RestartPolicy(initial_backoff_s=1.0, max_backoff_s=5.0, stable_after_s=60.0))
    s.on_started("prefill-0", "prefill", 0.0)
    s.on_started("decode-0", "decode", 0.0)
    return s


def test_deaths_in_a_row_double_the_backoff_up_to_the_cap():
    s = supervisor()
    delays = []
    now = 10.0
    for _ in range(5):
        delays.append(s.on_exit("decode-0", -9, now))
        now += delays[-1]
        assert s.due(now - 0.01) == [] and s.due(now) == ["decode-0"]
        s.on_started("decode-0", "decode", now)
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert s.num_restarts == 5


def test_a_worker_that_stayed_up_starts_again_from_the_first_backoff():
    s = supervisor()
    assert s.on_exit("decode-0", 1, 5.0) == 1.0
    s.on_started("decode-0", "decode", 6.0)
    assert s.on_exit("decode-0", 1, 7.0) == 2.0
    s.on_started("decode-0", "decode", 9.0)
    assert s.on_exit("decode-0", 1, 9.0 + 60.0) == 1.0


def test_pool_status_says_what_is_missing_and_why():
    s = supervisor()
    assert s.is_pool_ready("decode", {"decode-0"})
    s.on_exit("decode-0", -9, 10.0)
    assert not s.is_pool_ready("decode", set())
    assert s.pool_status("decode", set(), 10.2) == (
        "decode pool has 0 of 1 workers ready; decode-0 died (signal 9, SIGKILL), restarting "
        "in 1 s")
    s.due(11.0)
    s.on_started("decode-0", "decode", 11.0)
    assert s.pool_status("decode", set(), 14.0) == (
        "decode pool has 0 of 1 workers ready; decode-0 died (signal 9, SIGKILL) and was started "
        "again 3 s ago")
    s.observe_ready({"decode-0"})
    assert s.is_pool_ready("decode", {"decode-0"}) and s.is_pool_ready("decode", set())
    # A worker added later (by a planner) counts as ready without being supervised here.
    assert s.pool_status("decode", {"decode-0", "decode-7"}, 20.0) == (
        "decode pool has 2 of 2 workers ready")


def test_exit_descriptions_and_policy_checks():
    assert describe_exit(-15) == "died (signal 15, SIGTERM)"
    assert describe_exit(3) == "exited with code 3"
    with pytest.raises(ValueError, match="initial_backoff_s <= max_backoff_s"):
        RestartPolicy(initial_backoff_s=10.0, max_backoff_s=1.0)
