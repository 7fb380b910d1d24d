"""`tandem plan` picks a shape on the CPU profile of random:tiny, and its JSON holds the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.planner.plan import Shape, fewest_gpus, shapes_for
from tandem.planner.plan_cli import main, serve_command
from tandem.planner.sim_synthetic import synthetic_profile

CPU_PROFILE = Path(__file__).parents[2] / "planner" / "profiles" / "random-tiny-cpu.json"


@pytest.fixture
def profile_path(tmp_path) -> str:
    if CPU_PROFILE.exists():
        return str(CPU_PROFILE)
    path = tmp_path / "profile.json"  # until the measured CPU profile lands
    path.write_text(json.dumps(synthetic_profile(num_kv_blocks=512, max_model_len=2048)))
    return str(path)


def test_shapes_cover_aggregated_and_every_split():
    shapes = shapes_for(3, [256], [2048, 512])
    assert [(s.num_prefill, s.num_decode) for s in shapes] == \
        [(0, 3), (0, 3), (1, 2), (1, 2), (2, 1), (2, 1)]


def test_fewest_gpus_bisects_a_monotone_predicate():
    asked = []

    def meets(n: int) -> bool:
        asked.append(n)
        return n >= 5
    assert fewest_gpus(meets, 16) == 5
    assert len(asked) <= 6
    assert fewest_gpus(lambda n: False, 4) is None


def test_serve_command_names_the_shape():
    assert serve_command(Shape(1, 3, 128, 512), "random:tiny") == (
        "tandem serve --model random:tiny --num-prefill 1 --num-decode 3 "
        "--remote-prefill-min-tokens 128 --max-num-batched-tokens 512")


def test_plan_picks_a_shape_and_writes_the_table(profile_path, tmp_path, capsys):
    out = tmp_path / "plan.json"
    plot = tmp_path / "plan.png"
    code = main(["--profile", profile_path, "--gpus", "2", "--dataset", "random",
                 "--num-requests", "12", "--input-len", "64", "--output-len", "4",
                 "--request-rate", "0.2", "--slo", "ttft_ms=8000", "itl_ms=6000",
                 "--max-requests-per-probe", "12", "--remote-prefill-min-tokens", "16",
                 "--chunk-sizes", "1024", "--out", str(out), "--plot", str(plot)])
    assert code == 0
    plan = json.loads(out.read_text())
    assert {row["name"] for row in plan["table"]} == {
        "2 aggregated chunk1024", "1P:1D min16 chunk1024"}
    per_gpu = [row["goodput_per_gpu"] for row in plan["table"]]
    assert per_gpu == sorted(per_gpu, reverse=True)
    assert plan["best"] == plan["table"][0]
    assert plan["best"]["goodput_rps"] > 0
    assert all(row["probes"] for row in plan["table"])
    assert plan["num_requests_per_probe"] == 12
    assert "fewest_gpus" in plan
    assert plan["serve_command"] in capsys.readouterr().out
    assert plot.stat().st_size > 0


def test_serving_overheads_come_from_the_profile_unless_a_flag_sets_them(tmp_path):
    import argparse

    from tandem.planner.simulate_cli import (add_simulate_arguments, load_profile,
                                             sim_config_from_args)

    profile = synthetic_profile(num_kv_blocks=512, max_model_len=2048)
    profile["serving"] = {"frontend_overhead_ms": 0.5, "step_overhead_ms": 0.25,
                          "token_overhead_us": 40.0, "chunk_overhead_ms": 4.0,
                          "prefill_token_overhead_us": 2.0, "prompt_launch_ms": 8.0,
                          "measured": "x"}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)

    def config(*flags: str):
        args = parser.parse_args(["--profile", str(path), *flags])
        return sim_config_from_args(args, load_profile(args)[0], 1, 1)

    measured = config()
    assert (measured.frontend_overhead_s, measured.step_overhead_s, measured.token_overhead_s,
            measured.chunk_overhead_s, measured.prefill_token_overhead_s
            ) == pytest.approx((0.5e-3, 0.25e-3, 40e-6, 4e-3, 2e-6))
    assert measured.prompt_launch_s == pytest.approx(8e-3)
    assert config("--prompt-launch-ms", "0").prompt_launch_s == 0.0
    flagged = config("--chunk-overhead-ms", "0", "--token-overhead-us", "10")
    assert (flagged.chunk_overhead_s, flagged.token_overhead_s) == (0.0, pytest.approx(10e-6))
    assert flagged.step_overhead_s == pytest.approx(0.25e-3)
    del profile["serving"]
    path.write_text(json.dumps(profile))
    assert config().chunk_overhead_s == 0.0


def test_a_probe_whose_backlog_grows_does_not_keep_up():
    """Stable: requests in flight stay level (each takes 2 s, one a second arrives). Overloaded:
    each request takes longer than the one before, so the count in flight climbs all probe long."""
    from types import SimpleNamespace

    from tandem.planner.plan import keeps_up
    stable = [SimpleNamespace(start_s=float(t), e2e_ms=2000.0) for t in range(120)]
    growing = [SimpleNamespace(start_s=float(t), e2e_ms=2000.0 + 500.0 * t) for t in range(120)]
    assert keeps_up(stable)
    assert not keeps_up(growing)


def test_a_stable_probe_whose_arrivals_pause_midway_keeps_up():
    """A few requests in flight, and a lull at half the probe (none in flight then), later a
    short burst: counted at two instants (0 at the midpoint, 6 at the last arrival) it read as a
    backlog; over windows the load is level."""
    from types import SimpleNamespace

    from tandem.planner.plan import keeps_up
    starts = ([k * 0.5 for k in range(101) if not 45 <= k <= 50]      # none from 22.5 to 25 s
              + [49.6, 49.7, 49.8, 49.9])
    records = [SimpleNamespace(start_s=t, e2e_ms=1500.0) for t in sorted(starts)]
    at = lambda t: sum(1 for r in records if r.start_s <= t < r.start_s + 1.5)  # noqa: E731
    assert (at(25.0), at(50.0)) == (0, 7)   # what the instants saw: 7 > 3 x sqrt(1) + 1
    assert keeps_up(records)
