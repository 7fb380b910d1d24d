"""The serve configuration: one nested config, one default per setting, one precedence rule, and a
worker spec that travels as JSON."""

from __future__ import annotations

import pytest

from tandem.engine.config import EngineConfig
from tandem.launcher.config import SETTINGS, ServeConfig, build_serve_config, default_of
from tandem.launcher.serve import worker_specs
from tandem.router.kv_policy import KVPolicyConfig
from tandem.router.routing import RoutingConfig
from tandem.worker.config import WorkerConfig, WorkerOptions


def test_defaults_come_from_the_components():
    config = ServeConfig()
    assert config.engine == EngineConfig()
    assert config.router == RoutingConfig()
    assert config.router.policy.overlap_weight == KVPolicyConfig().overlap_weight == 4.0
    assert config.worker == WorkerConfig()
    assert default_of(next(s for s in SETTINGS if s.name == "block_size")) == 16


def test_flag_beats_environment_beats_yaml_beats_default(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("num_decode: 2\nblock_size: 32\nrouter_mode: least-loaded\n"
                    "engine:\n  max_num_seqs: 8\n")
    env = {"TANDEM_BLOCK_SIZE": "64", "TANDEM_ROUTER_MODE": "random"}
    config = build_serve_config({"router_mode": "round-robin", "num_prefill": None}, str(path),
                                environ=env)
    assert config.num_decode == 2                       # YAML
    assert config.engine.block_size == 64               # environment over YAML
    assert config.router.policy.mode == "round-robin"   # flag over both
    assert config.engine.max_num_seqs == 8              # a YAML section
    assert config.num_prefill == 1                      # default


def test_planner_settings_nest_and_parse_the_slo():
    config = build_serve_config({"slo": ["ttft_ms=300", "itl_ms=25"], "gpu_budget": 4},
                                environ={})
    assert (config.planner.ttft_ms, config.planner.itl_ms, config.planner.gpu_budget) == \
        (300.0, 25.0, 4)


@pytest.mark.parametrize("flags, message", [
    ({"block_size": 12}, "block_size must be a power of two"),
    ({"router_mode": "nearest"}, "router mode must be one of"),
    ({"num_decode": 0}, "num_decode must be at least 1"),
    ({"kv_lease_s": 0.0}, "kv_lease_s must be > 0"),
    ({"http_port": 70000}, "http_port must be a TCP port"),
])
def test_each_config_validates_with_an_actionable_message(flags, message):
    with pytest.raises(ValueError, match=message):
        build_serve_config(flags, environ={})


def test_unknown_and_mistyped_yaml_settings_are_named(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("num_decodes: 2\n")
    with pytest.raises(ValueError, match="unknown setting 'num_decodes'"):
        build_serve_config({}, str(path), environ={})
    path.write_text("max_num_seqs: many\n")
    with pytest.raises(ValueError, match="setting max_num_seqs: expected int"):
        build_serve_config({}, str(path), environ={})
    path.write_text("engine:\n  block_sizes: 16\n")
    with pytest.raises(ValueError, match="block_sizes"):
        build_serve_config({}, str(path), environ={})


def test_worker_specs_carry_the_engine_in_each_role_and_round_trip_as_json():
    config = build_serve_config({"num_prefill": 1, "num_decode": 2, "device": "cpu",
                                 "block_size": 32, "kv_lease_s": 7.0}, environ={})
    specs = worker_specs(config, "127.0.0.1:5000")
    assert [(s.worker_id, s.role, s.engine.role) for s in specs] == [
        ("prefill-0", "prefill", "prefill"), ("decode-0", "decode", "decode"),
        ("decode-1", "decode", "decode")]
    assert all(s.engine.block_size == 32 and s.lease_s == 7.0 and s.enable_kv_transfer
               for s in specs)
    assert WorkerOptions.from_json(specs[0].to_json()) == specs[0]
    aggregated = worker_specs(build_serve_config({"num_prefill": 0, "device": "cpu"}, environ={}),
                              "127.0.0.1:5000")
    assert [s.enable_kv_transfer for s in aggregated] == [False]


def test_a_worker_spec_refuses_an_engine_of_another_role():
    with pytest.raises(ValueError, match="engine is built for 'both'"):
        WorkerOptions("decode-0", "decode", "127.0.0.1:1", EngineConfig())
