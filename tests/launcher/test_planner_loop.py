"""The planner adapter's bookkeeping, without processes: ids, devices, roles, and the workers it
reports (registered, draining, being flipped, still starting)."""

from __future__ import annotations

from tandem.contracts.worker_stats import Registration, WorkerStats
from tandem.launcher.planner_loop import (Devices, PlannerLoop, WorkerIds, planner_role,
                                          serving_planner, worker_role)
from tandem.router.worker_registry import WorkerRegistry


def test_worker_ids_are_never_reused():
    ids = WorkerIds(["prefill-0", "decode-0", "decode-1"])
    assert ids.next("decode") == "decode-2"
    assert ids.next("prefill") == "prefill-1"
    assert ids.next("decode") == "decode-3"  # decode-2 was given out, even if it is gone now


def test_devices_one_gpu_each_and_the_cpu_shared():
    gpus = Devices(["cuda:0", "cuda:1", "cuda:2"], {"prefill-0": "cuda:0"})
    assert gpus.take("a") == "cuda:1" and gpus.take("b") == "cuda:2"
    assert gpus.take("c") is None
    gpus.give_back("a")
    assert gpus.take("c") == "cuda:1"
    cpu = Devices(["cpu"], {"decode-0": "cpu"})
    assert cpu.take("x") == "cpu" and cpu.take("y") == "cpu"


def test_roles_map_aggregated_to_decode_workers():
    assert planner_role("decode", "agg") == "both"
    assert planner_role("decode", "disagg") == "decode"
    assert planner_role("prefill", "agg") == "prefill"
    assert worker_role("both") == "decode" and worker_role("prefill") == "prefill"


class _Config:
    layout = "disagg"


class _Deployment:
    def dead_workers(self) -> list[str]:
        return ["decode-9"]


class _Frontend:
    def __init__(self, registry: WorkerRegistry):
        self.workers = registry


def test_worker_views_mark_draining_busy_and_starting_workers_not_ready():
    registry = WorkerRegistry("m", 16)
    for worker_id, role in (("prefill-0", "prefill"), ("decode-0", "decode"),
                            ("decode-1", "decode")):
        registry.register(Registration(worker_id, role, "a:1", 16, "m", 100), 0.0)
    registry.heartbeat("decode-0", WorkerStats(num_running=3, num_waiting=1, num_blocks=100,
                                               num_free_blocks=75), 0.0)
    registry.set_draining("decode-1")
    loop = PlannerLoop.__new__(PlannerLoop)  # only the bookkeeping, no planner or servers
    loop.config, loop.frontend, loop.deployment = _Config(), _Frontend(registry), _Deployment()
    loop._busy = {"prefill-0"}
    loop._starting = {"decode-2": "decode", "decode-0": "decode", "decode-9": "decode"}
    views = {v.worker_id: v for v in loop._worker_views()}
    assert sorted(views) == ["decode-0", "decode-1", "decode-2", "prefill-0"]
    assert views["decode-0"].is_ready and views["decode-0"].num_requests == 4
    assert views["decode-0"].kv_usage == 0.25
    assert not views["decode-1"].is_ready          # draining
    assert not views["prefill-0"].is_ready         # being flipped or removed
    assert not views["decode-2"].is_ready and views["decode-2"].role == "decode"
    # Registered (decode-0) and dead (decode-9) workers are no longer starting.
    assert loop._starting == {"decode-2": "decode"}
    assert [w.worker_id for w in registry.pool("decode")] == ["decode-0"]


def test_planner_flag_keeps_the_yaml_planner_section(tmp_path):
    from tandem.launcher.config import build_serve_config
    path = tmp_path / "serve.yaml"
    path.write_text("planner: {hold_s: 4, min_prefill: 0}\n")
    config = build_serve_config({"planner": "on"}, str(path), environ={})
    assert (config.planner.mode, config.planner.hold_s, config.planner.min_prefill) == ("on", 4, 0)


def test_the_sizing_uses_the_workers_batch_limit_and_step_budget():
    # A decode worker runs at most max_num_seqs sequences: sized with the engine default (256)
    # instead, the planner would count on batches the workers never run and keep too few.
    from tandem.engine.config import EngineConfig
    from tandem.planner.config import PlannerConfig
    from tandem.planner.perf_model import PerfModel
    from tandem.planner.profile_catalog import default_profile
    from tandem.router.routing import RoutingConfig

    engine = EngineConfig(max_num_seqs=64, max_num_batched_tokens=1024)
    model = PerfModel.load(default_profile("random:tiny", "cpu"))
    planner = serving_planner(PlannerConfig(mode="advisory", ttft_ms=1000, itl_ms=100), model,
                              engine, RoutingConfig(remote_prefill_min_tokens=300))
    target = planner._target
    assert (target.max_batch_size, target.chunk_tokens, target.prefill_chunk_tokens) == (
        64, 1024, 1024)
    assert target.remote_prefill_min_tokens == 300
