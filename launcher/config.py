"""`tandem serve`'s configuration: one `ServeConfig` that nests each component's own config.

Every setting has one default, in the dataclass of the component that uses it (EngineConfig,
RoutingConfig, KVPolicyConfig, WorkerConfig, FrontendConfig, PlannerConfig), and each is validated
once, by that dataclass. The command line and YAML speak in flat names (`--block-size`,
`block_size: 32`) that `SETTINGS` maps onto the nested fields; a YAML file may also give a whole
section (`engine: {block_size: 32}`). Precedence: flag > `TANDEM_<NAME>` environment variable >
YAML > default.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from tandem.engine.config import EngineConfig
from tandem.frontend.server import FrontendConfig
from tandem.launcher.ray_config import RayConfig
from tandem.planner.config import PlannerConfig, parse_slo
from tandem.router.kv_policy import KVPolicyConfig
from tandem.router.routing import RoutingConfig
from tandem.worker.config import WorkerConfig

DEVICES = ("auto", "cpu", "cuda")
LAUNCHERS = ("local", "ray")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_GPU = re.compile(r"cuda:\d+")


def listed_devices(device: str) -> list[str] | None:
    """`cuda:2,cuda:3` -> ["cuda:2", "cuda:3"]; None for auto, cpu and cuda; ValueError for
    anything else."""
    if device in DEVICES:
        return None
    listed = [part.strip() for part in device.split(",")]
    if not all(_GPU.fullmatch(part) for part in listed):
        raise ValueError(f"device must be one of {DEVICES} or GPUs listed one per worker "
                         f"(cuda:2,cuda:3), got {device!r}")
    if len(set(listed)) != len(listed):
        raise ValueError(f"device lists a GPU twice: {device!r}; each worker needs its own")
    return listed


@dataclass(slots=True)
class ServeConfig:
    num_prefill: int = 1             # 0: decode workers prefill themselves (aggregated serving)
    num_decode: int = 1
    device: str = "auto"             # auto | cpu | cuda (one GPU per worker) | cuda:2,cuda:3,...
    log_level: str = "WARNING"       # of the frontend and every worker
    drain_timeout_s: float = 30.0    # on SIGTERM, how long requests in flight may still run
    ready_timeout_s: float = 300.0   # how long workers may take to load and register
    planner_profile: str | None = None  # the planner's performance model; None: the shipped
                                        # profile of the model on this device (planner/profiles)
    engine: EngineConfig = field(default_factory=EngineConfig)
    router: RoutingConfig = field(default_factory=RoutingConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    launcher: str = "local"          # local: child processes; ray: Ray actors (ray_deploy.py)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.num_decode < 1:
            raise ValueError(f"num_decode must be at least 1, got {self.num_decode}")
        if self.num_prefill < 0:
            raise ValueError(f"num_prefill must be 0 or more, got {self.num_prefill}")
        if listed_devices(self.device) is not None and self.launcher == "ray":
            raise ValueError("a device list (cuda:N,...) needs --launcher local: Ray picks each "
                             "actor's GPU")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.drain_timeout_s < 0 or self.ready_timeout_s <= 0:
            raise ValueError("drain_timeout_s must be >= 0 and ready_timeout_s > 0 seconds")


@dataclass(frozen=True, slots=True)
class Setting:
    name: str                  # flag --name-with-dashes, YAML key, TANDEM_NAME
    path: tuple[str, ...]      # where it lives in ServeConfig
    help: str


SETTINGS = [
    Setting("model", ("engine", "model"), "what to serve: an HF model directory, a Hub id already "
            "in the local Hugging Face cache (Qwen/Qwen3-0.6B; never downloaded here: fetch it "
            "first with `hf download`), or random:<preset> (random weights, no files)"),
    Setting("served_model_name", ("frontend", "serving", "served_model_names"),
            "one or more names clients may send as `model`; /v1/models lists them and "
            "responses carry the first; unset: --model as given"),
    Setting("chat_template", ("frontend", "serving", "chat_template"),
            "chat template replacing the tokenizer's: a Jinja file or the template itself"),
    Setting("tool_call_parser", ("frontend", "tool_call_parser"),
            "how tool calls are read out of chat replies: llama3_json (Llama 3 JSON) or hermes "
            "(Qwen / Hermes <tool_call> tags); unset: picked from the chat template, and a "
            "template that shows no tool format refuses requests with tools"),
    Setting("generation_config", ("frontend", "serving", "generation_config"),
            "sampling defaults for fields a request leaves unset: auto (the model's "
            "generation_config.json), vllm or none (ignore it), or a path to another "
            "generation_config.json"),
    Setting("num_prefill", ("num_prefill",), "prefill worker processes (one GPU each); 0 serves "
            "aggregated: decode workers prefill their own prompts"),
    Setting("num_decode", ("num_decode",), "decode worker processes (one GPU each); they stream "
            "the tokens, at least 1"),
    Setting("device", ("device",), "where workers run: auto (cuda if present), cpu, cuda (one "
            "GPU each, cuda:0 upwards) or a list such as cuda:2,cuda:3 given to the workers in "
            "order, prefill workers first"),
    Setting("dtype", ("engine", "dtype"), "weights and activations: auto (bfloat16 on a GPU, "
            "float32 on a CPU), float32, bfloat16 or float16"),
    Setting("seed", ("engine", "seed"), "seed of random:<preset> weights and of sampling for "
            "requests that give no seed"),
    Setting("enforce_eager", ("engine", "enforce_eager"), "run decode eagerly instead of "
            "through captured CUDA graphs (slower; starts faster, uses less memory)"),
    Setting("enable_prefix_caching", ("engine", "enable_prefix_caching"),
            "reuse the KV blocks of prompt prefixes seen before (--no-enable-prefix-caching "
            "recomputes every prompt)"),
    Setting("log_level", ("log_level",), "DEBUG, INFO, WARNING or ERROR, for the frontend and "
            "every worker"),
    Setting("host", ("frontend", "host"), "address the public HTTP and gRPC APIs bind"),
    Setting("internal_host", ("frontend", "control_host"),
            "address the workers and the frontend's control service bind: 127.0.0.1 keeps them "
            "on this machine; 0.0.0.0 opens them to a cluster, each advertising its node's IP"),
    Setting("http_port", ("frontend", "http_port"), "OpenAI HTTP API port"),
    Setting("grpc_port", ("frontend", "grpc_port"), "public gRPC API port"),
    Setting("api_key", ("frontend", "access", "api_key"), "key the public APIs require "
            "(HTTP 'Authorization: Bearer KEY', gRPC metadata 'authorization: Bearer KEY'); "
            "prefer TANDEM_API_KEY, as a flag shows in ps; /health, /metrics stay open"),
    Setting("ssl_certfile", ("frontend", "access", "ssl_certfile"),
            "PEM certificate (chain): HTTP and gRPC serve TLS only"),
    Setting("ssl_keyfile", ("frontend", "access", "ssl_keyfile"),
            "PEM private key of ssl_certfile"),
    Setting("block_size", ("engine", "block_size"), "tokens per KV block, the unit of caching, "
            "routing and transfer (a power of two)"),
    Setting("num_kv_blocks", ("engine", "num_kv_blocks"), "KV blocks per worker; unset: sized "
            "from memory"),
    Setting("max_model_len", ("engine", "max_model_len"), "context length; unset: the model's"),
    Setting("max_num_seqs", ("engine", "max_num_seqs"), "sequences a worker runs at once"),
    Setting("max_num_batched_tokens", ("engine", "max_num_batched_tokens"),
            "token budget of one step (the prefill chunk size)"),
    Setting("gpu_memory_utilization", ("engine", "gpu_memory_utilization"),
            "fraction of GPU memory a worker may use"),
    Setting("remote_prefill_min_tokens", ("router", "remote_prefill_min_tokens"),
            "shorter uncached prompts are prefilled on the decode worker"),
    Setting("max_prefill_queue", ("router", "max_prefill_queue"),
            "prefills in flight per prefill worker before prefilling locally"),
    Setting("router_mode", ("router", "policy", "mode"), "how a request's workers are chosen: kv "
            "(most cached prompt blocks, fewest active ones), round-robin, random or "
            "least-loaded"),
    Setting("kv_overlap_weight", ("router", "policy", "overlap_weight"),
            "cost of one uncached prompt block against one active block"),
    Setting("router_temperature", ("router", "policy", "temperature"),
            "0: always the cheapest worker; > 0: sample by cost"),
    Setting("kv_lease_s", ("worker", "lease_s"), "a prefill worker frees unpulled blocks after this"),
    Setting("transfer_timeout_s", ("worker", "transfer_timeout_s"),
            "a slower KV pull falls back to recompute on the decode worker"),
    Setting("worker_suspect_after_s", ("frontend", "suspect_after_s"),
            "a worker whose heartbeats are late this long is routed no new requests; its "
            "requests in flight go on, and its next heartbeat makes it routable again"),
    Setting("worker_dead_after_s", ("frontend", "dead_after_s"),
            "a worker silent this long is declared dead: its streams end and migrate (one whose "
            "process exited or whose connection broke is declared dead at once)"),
    Setting("frontend_silence_s", ("worker", "frontend_silence_s"),
            "a worker that cannot reach its frontend this long exits"),
    Setting("drain_timeout_s", ("drain_timeout_s",), "on SIGTERM, requests in flight get this long"),
    Setting("ready_timeout_s", ("ready_timeout_s",), "workers must register within this"),
    Setting("planner", ("planner", "mode"), "pool sizing from load and SLOs: off, advisory "
            "(logs and exports what it would do) or on (adds, removes and flips workers)"),
    Setting("slo", ("planner",), "latency targets the planner sizes for, e.g. "
            "'ttft_ms=500 itl_ms=40'"),
    Setting("gpu_budget", ("planner", "gpu_budget"), "GPUs the planner may use in all"),
    Setting("planner_interval_s", ("planner", "interval_s"), "seconds between planner decisions"),
    Setting("planner_profile", ("planner_profile",), "`tandem profile` JSON the planner sizes "
            "pools with; unset: the shipped one for the model and device"),
    Setting("planner_layout", ("planner", "layout"), "pools the planner sizes: disagg (prefill + "
            "decode) or agg (decode workers that prefill themselves)"),
    Setting("launcher", ("launcher",), "local (child processes) or ray (Ray actors on a cluster)"),
    Setting("ray_address", ("ray", "address"), "Ray cluster to join (auto, or host:port); "
            "unset: start Ray on this machine"),
    Setting("prefill_resources", ("ray", "prefill_resources"), "where prefill actors go: "
            "custom resources and node labels, JSON or k=v (prefill_node=1,zone=a)"),
    Setting("decode_resources", ("ray", "decode_resources"), "where decode actors go, as "
            "prefill_resources"),
    Setting("ray_cpus_per_worker", ("ray", "num_cpus_per_worker"), "CPUs each worker actor "
            "asks Ray for (its torch threads on a CPU)"),
]
_BY_NAME = {s.name: s for s in SETTINGS}
_SECTIONS = {"engine", "router", "worker", "frontend", "planner", "ray"}


def default_of(setting: Setting) -> Any:
    value: Any = ServeConfig()
    for part in setting.path:
        value = getattr(value, part)
    return value


def field_type(setting: Setting) -> str:
    """The annotation of the setting's field, as written ("int", "float | None", ...)."""
    cls: Any = ServeConfig
    for part in setting.path[:-1]:
        cls = _field_default_type(cls, part)
    return next(f.type for f in dataclasses.fields(cls) if f.name == setting.path[-1])


def build_serve_config(flags: dict[str, Any], yaml_path: str | None = None,
                       environ: dict[str, str] | None = None) -> ServeConfig:
    """flags (None: not given) > TANDEM_<NAME> > YAML > defaults; raises ValueError."""
    values: dict[str, Any] = _from_yaml(yaml_path) if yaml_path else {}
    environ = os.environ if environ is None else environ
    for setting in SETTINGS:
        env = environ.get("TANDEM_" + setting.name.upper())
        if env is not None:
            _set(values, setting.name, env)
    for name, value in flags.items():
        if value is not None:
            _set(values, name, value)
    return _assemble(values)


def _set(values: dict[str, Any], name: str, value: Any) -> None:
    """A flat setting over what the YAML gave. `--planner on` names a field of the YAML section
    `planner:`: it goes into that section instead of replacing it."""
    section = values.get(name)
    setting = _BY_NAME.get(name)
    if name in _SECTIONS and isinstance(section, dict) and setting is not None:
        values[name] = {**section, setting.path[-1]: _coerce(setting, value)}
    else:
        values[name] = value


def _assemble(values: dict[str, Any]) -> ServeConfig:
    nested: dict[str, Any] = {}
    # Whole YAML sections first, so that a flat setting (from the environment, say) lands on
    # top of its section instead of being replaced by it.
    sections = {name: value for name, value in values.items()
                if name in _SECTIONS and isinstance(value, dict)}
    for name, section in sections.items():
        for key, inner in section.items():
            _put(nested, (name, key), inner)
    for name, value in values.items():
        if name in sections:
            continue
        setting = _BY_NAME.get(name)
        if setting is None:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(_BY_NAME))}")
        if setting.name == "slo":
            for key, target in parse_slo(value).items():
                _put(nested, ("planner", key), target)
            continue
        _put(nested, setting.path, _coerce(setting, value))
    try:
        return _build(ServeConfig, nested)
    except TypeError as err:  # an unknown key inside a YAML section
        raise ValueError(f"bad configuration: {err}") from None


def _build(cls: Any, values: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values.pop(f.name)
        if isinstance(value, dict) and dataclasses.is_dataclass(_field_default_type(cls, f.name)):
            value = _build(_field_default_type(cls, f.name), value)
        kwargs[f.name] = value
    if values:
        raise ValueError(f"unknown setting(s) for {cls.__name__}: {', '.join(values)}")
    return cls(**kwargs)


def _field_default_type(cls: Any, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return type(f.default_factory())
    return type(f.default)


def _put(nested: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        nested = nested.setdefault(part, {})
    current = nested.get(path[-1])
    if isinstance(current, dict) and isinstance(value, dict):
        current.update(value)  # a sub-section (frontend: {serving: ...}) and a flat setting in it
    else:
        nested[path[-1]] = value


def _coerce(setting: Setting, value: Any) -> Any:
    """Strings from flags and the environment (and YAML scalars) to the field's type."""
    kind = field_type(setting)
    if value is None or (isinstance(value, str) and value.lower() == "none" and "None" in kind):
        return None
    base = kind.split("|")[0].strip()
    if base.startswith("tuple"):
        return _as_names(setting, value)
    try:
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "float":
            return float(value)
        if base == "bool":
            return _as_bool(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {setting.name}: expected {kind}, got {value!r}") from None


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError  # _coerce names the setting and the type


def _as_names(setting: Setting, value: Any) -> tuple[str, ...]:
    """A list of names from a flag (a list), YAML (a list or a string) or the environment (names
    separated by commas or spaces)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"setting {setting.name}: expected one or more names, got {value!r}")
    return tuple(str(item) for item in items)


def _from_yaml(path: str) -> dict[str, Any]:
    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}
