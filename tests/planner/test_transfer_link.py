"""KV transfers priced on a given link (`--transfer-gbps`): for a profile measured on one device,
or to ask what another interconnect would do to a deployment."""

from __future__ import annotations

import json

import pytest

from tandem.planner import plan_cli, simulate_cli
from tandem.planner.perf_model import PerfModel
from tandem.planner.sim_synthetic import synthetic_profile


def test_a_link_prices_each_transfer_as_latency_plus_bytes_over_bandwidth():
    measured = PerfModel.from_profile(synthetic_profile())
    linked = measured.with_transfer_link(50e9, 20e-6)
    for num_bytes in (2 ** 20, 512 * 2 ** 20, 4 * 2 ** 30):
        assert linked.transfer_s(num_bytes) == pytest.approx(20e-6 + num_bytes / 50e9)
    assert linked.transfer_s(0) == 0.0
    assert measured.transfer_s(2 ** 30) != pytest.approx(linked.transfer_s(2 ** 30))  # untouched
    assert linked.decode_s(8, 8000) == measured.decode_s(8, 8000)
    with pytest.raises(ValueError, match="positive bandwidth"):
        measured.with_transfer_link(0.0, 1e-5)


def _simulate(tmp_path, profile: dict, *flags: str) -> tuple[int, dict | None]:
    path, out = tmp_path / "profile.json", tmp_path / "sim.json"
    path.write_text(json.dumps(profile))
    out.unlink(missing_ok=True)
    code = simulate_cli.main(["--profile", str(path), "--num-prefill", "1", "--num-decode", "1",
                              "--num-requests", "40", "--input-len", "4096", "--output-len", "16",
                              "--request-rate", "2", "--out", str(out), *flags])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_a_one_device_profile_simulates_disaggregation_only_with_a_link(tmp_path, capsys):
    profile = synthetic_profile(with_transfer=False)
    code, _ = _simulate(tmp_path, profile)
    assert code == 2 and "--transfer-gbps" in capsys.readouterr().err
    code, fast = _simulate(tmp_path, profile, "--transfer-gbps", "400")
    assert code == 0
    code, slow = _simulate(tmp_path, profile, "--transfer-gbps", "2")
    assert code == 0
    # The first token comes from the prefill worker; the pull delays the decode worker's start,
    # so each request ends later by the two links' difference on its prompt's KV.
    kv_bytes = 4096 * profile["kv_bytes_per_token"]
    assert slow["ttft_ms"]["p50"] == pytest.approx(fast["ttft_ms"]["p50"])
    assert slow["e2e_ms"]["p50"] - fast["e2e_ms"]["p50"] == pytest.approx(
        (kv_bytes / 2e9 - kv_bytes / 400e9) * 1e3, rel=0.2)


def _plan(tmp_path, num_requests: int, *flags: str) -> dict:
    """`tandem plan` for 2 GPUs on a one-device profile (no transfer points), 300-token prompts."""
    path, out = tmp_path / "profile.json", tmp_path / "plan.json"
    path.write_text(json.dumps(synthetic_profile(num_kv_blocks=2000, max_model_len=4096,
                                                 with_transfer=False)))
    assert plan_cli.main(["--profile", str(path), "--gpus", "2", "--num-requests",
                          str(num_requests), "--input-len", "300", "--output-len", "8",
                          "--max-requests-per-probe", str(num_requests), "--chunk-sizes", "512",
                          "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_plan_records_the_link_it_priced_transfers_on(tmp_path):
    plan = _plan(tmp_path, 10, "--slo", "ttft_ms=500", "--transfer-gbps", "25")
    assert plan["transfer"].startswith("link of 25 GB/s")
    assert "1P:1D min256 chunk512" in {row["name"] for row in plan["table"]}


def test_a_shape_whose_requests_miss_even_alone_is_not_searched_to_the_floor(tmp_path):
    # On a 0.5 GB/s link a 300-token prompt's KV takes about 80 ms to pull, so on 1P:1D every
    # request's second token comes more than 40 ms after its first whatever the rate: once a
    # probe's requests ran one at a time and missed, the search stops halving the rate.
    assert 300 * synthetic_profile()["kv_bytes_per_token"] / 0.5e9 > 0.06
    plan = _plan(tmp_path, 100, "--slo", "ttft_ms=500", "itl_ms=40", "--transfer-gbps", "0.5")
    rows = {row["name"]: row for row in plan["table"]}
    split, aggregated = rows["1P:1D min256 chunk512"], rows["2 aggregated chunk512"]
    assert split["goodput_rps"] == 0.0
    assert all(probe["attainment"] == 0.0 for probe in split["probes"])
    assert len(split["probes"]) < 14          # not halved down max_doublings times
    assert aggregated["goodput_rps"] > 0.0


def test_plan_on_a_one_device_profile_without_a_link_ranks_the_aggregated_shapes(tmp_path,
                                                                                  capsys):
    plan = _plan(tmp_path, 10, "--slo", "ttft_ms=500", "--request-rate", "2")
    assert [row["num_prefill"] for row in plan["table"]] == [0]
    assert plan["transfer"] == "none: aggregated shapes only"
    assert "aggregated" in plan["fewest_gpus"]["shape"]
    assert "aggregated shapes only" in capsys.readouterr().out
