"""Model shape and behaviour, read from an HF `config.json` or taken from a `random:` preset.

One dataclass covers the four supported decoder families; their differences are three switches:
`qkv_bias` (Qwen2), `qk_norm` (Qwen3) and `tie_word_embeddings`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

# architectures name -> (qkv_bias, qk_norm)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}
MODEL_TYPE_TO_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements one token occupies across all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    def with_eos(self, eos_token_ids: tuple[int, ...]) -> ModelConfig:
        return replace(self, eos_token_ids=eos_token_ids)


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _rope_settings(raw: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either the rope_parameters dict or the older rope_theta/rope_scaling."""
    params = raw.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"rope scaling {scaling!r} is not supported; supported: llama3")
    return float(theta), scaling


def parse_hf_config(raw: dict, source: str) -> ModelConfig:
    """Validate an HF config dict; `source` names where it came from, for error messages."""
    architectures = raw.get("architectures") or []
    arch = architectures[0] if architectures else MODEL_TYPE_TO_ARCHITECTURE.get(raw.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        named = arch or raw.get("model_type") or "none given"
        raise ValueError(f"{source}: architecture {named!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    qkv_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size")
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"{source}: config.json lacks {', '.join(missing)}")
    num_heads = raw["num_attention_heads"]
    theta, scaling = _rope_settings(raw)
    sliding = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
    return ModelConfig(
        architecture=arch,
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        intermediate_size=raw["intermediate_size"],
        vocab_size=raw["vocab_size"],
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias or bool(raw.get("attention_bias", False)),
        qk_norm=qk_norm,
        sliding_window=sliding,
        eos_token_ids=_as_tuple(raw.get("eos_token_id")),
    )


def load_model_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} is not a model directory: it has no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return parse_hf_config(raw, str(model_dir))


def load_generation_defaults(model_dir: Path) -> dict:
    """generation_config.json, or {} when the directory has none."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
