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
    ({"worker_suspect_after_s": 40.0}, "worker_suspect_after_s < worker_dead_after_s, got 0.5, "
                                       "40.0 and 30.0"),
    ({"frontend_silence_s": 0.0}, "frontend_silence_s must be > 0"),
])
def test_each_config_validates_with_an_actionable_message(flags, message):
    with pytest.raises(ValueError, match=message):
        build_serve_config(flags, environ={})


def test_liveness_settings_from_flag_environment_and_yaml(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("worker_dead_after_s: 90\nfrontend: {suspect_after_s: 4}\n")
    config = build_serve_config({"frontend_silence_s": 300.0}, str(path),
                                environ={"TANDEM_WORKER_SUSPECT_AFTER_S": "6"})
    assert (config.frontend.suspect_after_s, config.frontend.dead_after_s) == (6.0, 90.0)
    assert config.worker.frontend_silence_s == 300.0
    spec = worker_specs(config, "127.0.0.1:1")[0]
    assert WorkerOptions.from_json(spec.to_json()).config.frontend_silence_s == 300.0


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


def _parse_serve(argv: list[str]):
    from tandem.launcher.cli import build_parser
    return build_parser().parse_args(argv)


def test_vllm_serving_flags_reach_their_component_configs(tmp_path):
    from tandem.launcher.serve import load_serve_config
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    args = _parse_serve([
        "serve", "--served-model-name", "qwen", "qwen-latest", "--chat-template", str(template),
        "--generation-config", "vllm", "--dtype", "float16", "--seed", "7", "--enforce-eager",
        "--no-enable-prefix-caching", "--device", "cuda:2,cuda:3", "--log-level", "info"])
    config = load_serve_config(args)
    assert config.frontend.serving.served_model_names == ("qwen", "qwen-latest")
    assert config.frontend.serving.chat_template == str(template)
    assert config.frontend.serving.generation_config == "vllm"
    assert (config.engine.dtype, config.engine.seed) == ("float16", 7)
    assert config.engine.enforce_eager is True and config.engine.enable_prefix_caching is False
    assert config.device == "cuda:2,cuda:3" and config.log_level == "info"
    # Unset boolean flags leave the default (and the environment) in charge.
    assert load_serve_config(_parse_serve(["serve"])).engine.enable_prefix_caching is True


def test_serving_settings_from_environment_and_yaml(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("served_model_name: [a, b]\nenforce_eager: true\ndtype: bfloat16\n"
                    "frontend:\n  serving:\n    generation_config: none\n")
    env = {"TANDEM_SERVED_MODEL_NAME": "env-a, env-b", "TANDEM_ENABLE_PREFIX_CACHING": "false",
           "TANDEM_SEED": "11", "TANDEM_LOG_LEVEL": "debug"}
    config = build_serve_config({"dtype": "float32"}, str(path), environ=env)
    assert config.frontend.serving.served_model_names == ("env-a", "env-b")  # env over YAML
    assert config.frontend.serving.generation_config == "none"                 # a YAML section
    assert config.engine.enforce_eager is True and config.engine.enable_prefix_caching is False
    assert (config.engine.dtype, config.engine.seed, config.log_level) == ("float32", 11, "debug")
    assert build_serve_config({}, str(path), environ={}).frontend.serving.served_model_names == (
        "a", "b")


def test_tool_call_parser_from_flag_environment_and_yaml(tmp_path):
    from tandem.launcher.serve import load_serve_config
    assert ServeConfig().frontend.tool_call_parser is None        # picked from the template
    args = _parse_serve(["serve", "--tool-call-parser", "hermes"])
    assert load_serve_config(args).frontend.tool_call_parser == "hermes"
    path = tmp_path / "serve.yaml"
    path.write_text("tool_call_parser: hermes\n")
    env = {"TANDEM_TOOL_CALL_PARSER": "llama3_json"}
    assert build_serve_config({}, str(path), environ=env).frontend.tool_call_parser == "llama3_json"
    assert build_serve_config({}, str(path), environ={}).frontend.tool_call_parser == "hermes"
    with pytest.raises(ValueError, match=r"tool_call_parser must be one of \['hermes', "
                                         r"'llama3_json'\], got 'mistral'"):
        build_serve_config({"tool_call_parser": "mistral"}, environ={})


def test_log_level_before_or_after_serve():
    from tandem.launcher.serve import load_serve_config
    assert load_serve_config(_parse_serve(["--log-level", "ERROR", "serve"])).log_level == "ERROR"
    assert load_serve_config(
        _parse_serve(["--log-level", "ERROR", "serve", "--log-level", "INFO"])).log_level == "INFO"


@pytest.mark.parametrize("flags, message", [
    ({"device": "cuda:0,gpu1"}, "GPUs listed one per worker"),
    ({"device": "cuda:1,cuda:1"}, "lists a GPU twice"),
    ({"device": "cuda:0,cuda:1", "launcher": "ray"}, "needs --launcher local"),
    ({"dtype": "int8"}, "dtype must be auto, float32, bfloat16 or float16"),
    ({"log_level": "LOUD"}, "log_level must be one of"),
    ({"chat_template": "/no/such/template.jinja"}, "neither a file nor a Jinja template"),
    ({"generation_config": "/no/such/dir"}, "not auto, vllm, none, a generation_config.json"),
    ({"enforce_eager": "maybe"}, "expected bool"),
])
def test_serving_flags_validate_with_an_actionable_message(flags, message):
    with pytest.raises(ValueError, match=message):
        build_serve_config(flags, environ={})


def test_listed_gpus_go_to_the_workers_in_order():
    from tandem.launcher.serve import assign_gpus
    assert assign_gpus("cuda:2,cuda:3", 2, num_gpus=4) == ["cuda:2", "cuda:3"]
    assert assign_gpus("cuda:3,cuda:1,cuda:0", 2, num_gpus=4) == ["cuda:3", "cuda:1"]
    assert assign_gpus("cuda", 3, num_gpus=4) == ["cuda:0", "cuda:1", "cuda:2"]
    with pytest.raises(ValueError, match="--device lists 1"):
        assign_gpus("cuda:2", 2, num_gpus=4)
    with pytest.raises(ValueError, match="cuda:5 do not exist"):
        assign_gpus("cuda:1,cuda:5", 2, num_gpus=4)


def test_help_says_what_each_setting_does_and_the_precedence(capsys):
    with pytest.raises(SystemExit):
        _parse_serve(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Precedence: flag > environment > YAML > default." in text
    for flag in ("--served-model-name", "--chat-template", "--generation-config", "--dtype",
                 "--seed", "--enforce-eager", "--no-enable-prefix-caching", "--log-level"):
        assert flag in text
    assert "cuda:2,cuda:3 given to the workers in order" in text
    assert all(len(setting.help.split()) >= 3 for setting in SETTINGS), "a help says what it does"
