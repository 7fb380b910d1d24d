"""`tandem profile` on a CPU: the grid it plans, and a real profile of random:tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.planner.perf_model import PerfModel
from tandem.planner.profile_grid import Repeats, default_grid, plan_points


def test_grid_skips_what_does_not_fit():
    grid = default_grid("cuda")
    # 2048 blocks of 16 tokens, 8192-token context, 64 sequences at most
    points = plan_points(grid, num_kv_blocks=2048, block_size=16, max_model_len=8192,
                         max_num_seqs=64)
    for kind, args in points:
        if kind == "prefill":
            new, cached = args
            assert new + cached < 8192
        elif kind == "decode":
            batch, context = args
            assert batch <= 64 and context < 8192
            assert batch * -(-(context + 11) // 16) <= 2048
        else:
            new, cached, batch, context = args
            assert batch + 1 <= 64 and new + cached < 8192
    kinds = {kind for kind, _ in points}
    assert kinds == {"prefill", "decode", "mixed"}
    assert ("prefill", (8192, 0)) not in points and ("prefill", (6144, 1024)) in points
    assert not any(kind == "decode" and args[0] > 64 for kind, args in points)


def test_grid_reaches_the_memory_limit():
    grid = default_grid("cuda")
    points = plan_points(grid, num_kv_blocks=50_000, block_size=16, max_model_len=131072,
                         max_num_seqs=256)
    batch_one = [args[1] for kind, args in points if kind == "decode" and args[0] == 1]
    assert max(batch_one) > 100_000  # the context limit, beyond the 32k grid
    biggest = max(args[0] * args[1] for kind, args in points if kind == "decode")
    assert biggest > 0.8 * 50_000 * 16


def test_passes_warm_up_then_stop_at_the_budget():
    from tandem.planner.profile_sweep import PassClock

    assert list(PassClock(Repeats(1, 2, 4, budget_s=1e9)).passes()) == [False, True, True, True,
                                                                         True]
    # a spent budget stops after min_timed
    assert list(PassClock(Repeats(2, 3, 9, budget_s=0.0)).passes()) == [False, False, True, True,
                                                                         True]


@pytest.mark.slow
def test_profile_writes_a_valid_profile_on_cpu(tmp_path, capsys):
    from tandem.planner.profile_cli import main

    out = tmp_path / "tiny.json"
    assert main(["--model", "random:tiny", "--device", "cpu", "--out", str(out), "--quick",
                 "--num-kv-blocks", "256", "--no-progress"]) == 0
    profile = json.loads(out.read_text())
    for key in ("model", "device_name", "tandem_version", "date", "block_size", "engine",
                "kv_bytes_per_token", "wall_s", "fit"):
        assert key in profile, key
    assert profile["model"] == "random:tiny" and profile["block_size"] == 16
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        assert profile["host_cpu"] and profile["host_cpu"] in cpuinfo.read_text()
    assert profile["engine"]["resolved_device"] == "cpu"
    # no CUDA graphs on a CPU: every point ran at its own row count
    assert profile["engine"]["step_graph_max_tokens"] is None
    # tiny: 4 layers x K and V x 2 KV heads x 32 dims x 4 bytes (float32 on a CPU)
    assert profile["kv_bytes_per_token"] == 4 * 2 * 2 * 32 * 4
    assert len(profile["prefill"]) == 6 and len(profile["mixed"]) == 4
    assert {p["batch_size"] for p in profile["decode"]} == {1, 4}
    for kind in ("prefill", "decode", "mixed"):
        assert all(p["seconds"] > 0 for p in profile[kind])
    assert profile["transfer"]["method"].startswith("local_copy")
    assert set(profile["fit"]) == {"prefill", "decode", "mixed", "transfer"}
    model = PerfModel.from_profile(profile)
    assert model.step_s(64, 0, 4, 4 * 64) > 0
    assert "held-back error" in capsys.readouterr().out


def test_decode_points_run_back_to_back_and_leave_the_engine_empty():
    # Decode is timed through LLMEngine.steps(), as serving runs it: the placed sequences end by
    # themselves after the steps wanted, and every block they held comes back.
    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine
    from tandem.planner.profile_points import StepProbe

    engine = LLMEngine(EngineConfig(model="random:tiny", role="both", device="cpu",
                                    num_kv_blocks=64, max_model_len=512))
    probe = StepProbe(engine)
    free = engine.block_manager.num_free_blocks
    point = probe.decode(3, 40, Repeats(2, 4, 4, budget_s=1e9))
    assert point["batch_size"] == 3 and point["num_repeats"] == 4
    # the timed steps are the 4th to 7th: before them, 3 warm-up steps (one untimed, the first)
    assert point["num_context_tokens"] == round(sum(3 * (40 + k) for k in range(3, 7)) / 4)
    assert point["seconds"] > 0
    assert engine.request_ids() == [] and engine.block_manager.num_free_blocks == free


def test_a_mixed_point_cuts_its_chunk_into_several_prompts_of_one_step():
    # 10 new tokens over 3 prompts (4 + 3 + 3, each after 8 cached) beside 2 decodes: one step
    # samples 5 tokens (step_s checks it) and leaves only the decodes running.
    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine
    from tandem.planner.profile_points import StepProbe

    engine = LLMEngine(EngineConfig(model="random:tiny", role="both", device="cpu",
                                    num_kv_blocks=64, max_model_len=512))
    probe = StepProbe(engine)
    seen = []
    engine.step_observer = lambda step: seen.append(list(step.batch.num_new_tokens))
    decodes = probe.place_decodes(2, 20)
    seconds, context = probe.mixed_once(10, 8, decodes, num_prompts=3)
    assert seconds > 0 and context == 40
    assert seen == [[1, 1, 4, 3, 3]]
    assert sorted(engine.request_ids()) == sorted(s.request_id for s in decodes)


def test_a_mixed_series_runs_a_prompts_chunks_beside_its_decodes_as_serving_does():
    # 32-token chunks of one prompt (64 cached at first) beside 3 decodes of 100 tokens: five
    # steps through LLMEngine.steps() under a budget of the decodes and one chunk; the intervals
    # but the first and the last time steps 2 and 3 (cached 128 and 160, decodes at 102 and 103
    # tokens each). The engine is left empty, its budget as it was.
    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine
    from tandem.planner.profile_points import StepProbe

    engine = LLMEngine(EngineConfig(model="random:tiny", role="both", device="cpu",
                                    num_kv_blocks=256, max_model_len=2048))
    probe = StepProbe(engine)
    budget = engine.scheduler.limits.max_num_batched_tokens
    seen = []
    engine.step_observer = lambda step: seen.append(
        (list(step.batch.num_new_tokens), step.batch.seqs[-1].num_computed_tokens))
    seconds, cached, context = probe.mixed_series(32, 64, 3, 100, num_steps=4)
    assert seen == [([1, 1, 1, 32], c) for c in (64, 96, 128, 160, 192)]
    assert seconds > 0 and cached == 144 and context == round((306 + 309) / 2)
    assert engine.request_ids() == [] and engine.scheduler.limits.max_num_batched_tokens == budget


@pytest.mark.slow
def test_profile_times_mixed_points_as_served_when_asked(tmp_path):
    from tandem.planner.profile_cli import main

    out = tmp_path / "tiny.json"
    assert main(["--model", "random:tiny", "--device", "cpu", "--out", str(out), "--quick",
                 "--num-kv-blocks", "256", "--no-progress", "--mixed-as-served"]) == 0
    profile = json.loads(out.read_text())
    assert "series of a long prompt's chunks" in profile["timing"]
    points = profile["mixed"]
    assert len(points) == 4 and all(p["seconds"] > 0 for p in points)
    # A series' timed steps come after its first two chunks: their cached prefix is past them.
    assert all(p["num_prefill_cached_tokens"] >= 2 * p["num_prefill_tokens"] for p in points)
    assert PerfModel.from_profile(profile).step_s(64, 0, 4, 4 * 64) > 0
