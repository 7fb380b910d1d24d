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


@dataclass(slots=True)
class ServeConfig:
    num_prefill: int = 1             # 0: decode workers prefill themselves (aggregated serving)
    num_decode: int = 1
    device: str = "auto"             # auto | cpu | cuda (one GPU per worker)
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
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.drain_timeout_s < 0 or self.ready_timeout_s <= 0:
            raise ValueError("drain_timeout_s must be >= 0 and ready_timeout_s > 0 seconds")


@dataclass(frozen=True, slots=True)
class Setting:
    name: str                  # flag --name-with-dashes, YAML key, TANDEM_NAME
    path: tuple[str, ...]      # where it lives in ServeConfig
    help: str


SETTINGS = [
    Setting("model", ("engine", "model"), "an HF model directory or random:<preset>"),
    Setting("num_prefill", ("num_prefill",), "prefill workers; 0 serves aggregated"),
    Setting("num_decode", ("num_decode",), "decode workers"),
    Setting("device", ("device",), "auto, cpu or cuda: one GPU per worker"),
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
    Setting("block_size", ("engine", "block_size"), "tokens per KV block (a power of two)"),
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
    Setting("router_mode", ("router", "policy", "mode"), "kv, round-robin, random or least-loaded"),
    Setting("kv_overlap_weight", ("router", "policy", "overlap_weight"),
            "cost of one uncached prompt block against one active block"),
    Setting("router_temperature", ("router", "policy", "temperature"),
            "0: always the cheapest worker; > 0: sample by cost"),
    Setting("kv_lease_s", ("worker", "lease_s"), "a prefill worker frees unpulled blocks after this"),
    Setting("transfer_timeout_s", ("worker", "transfer_timeout_s"),
            "a slower KV pull falls back to recompute on the decode worker"),
    Setting("drain_timeout_s", ("drain_timeout_s",), "on SIGTERM, requests in flight get this long"),
    Setting("ready_timeout_s", ("ready_timeout_s",), "workers must register within this"),
    Setting("planner", ("planner", "mode"), "off, advisory (report only) or on"),
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
    for name, value in values.items():
        if name in _SECTIONS and isinstance(value, dict):
            for key, inner in value.items():
                _put(nested, (name, key), inner)
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
    nested[path[-1]] = value


def _coerce(setting: Setting, value: Any) -> Any:
    """Strings from flags and the environment (and YAML scalars) to the field's type."""
    kind = field_type(setting)
    if value is None or (isinstance(value, str) and value.lower() == "none" and "None" in kind):
        return None
    base = kind.split("|")[0].strip()
    try:
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "float":
            return float(value)
        if base == "bool":
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {setting.name}: expected {kind}, got {value!r}") from None


def _from_yaml(path: str) -> dict[str, Any]:
    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}
