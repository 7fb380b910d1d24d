"""Tiny random Hugging Face checkpoints for tests: llama, mistral, qwen2 and qwen3.

Each is a real `save_pretrained` directory (config.json, safetensors weights, generation_config.json
and the built-in tokenizer with its chat template), a few hundred kilobytes, built in well under a
second. The shapes are small but keep every feature the engine must get right:

- llama: llama3 RoPE scaling (original context 64 of 512, so with rope_theta 500000 and head_dim 16
  the high, medium and low frequency bands are all present) and an untied LM head;
- mistral: no sliding window;
- qwen2: q/k/v biases and tied embeddings;
- qwen3: q/k RMSNorm and head_dim 32, which is not hidden_size / num_heads (16).

All use GQA (4 query heads, 2 KV heads) and float32. Every parameter is drawn from one seeded
generator, biases and norm weights included: transformers would start biases at zero and norms at
one, and then a loader that dropped them would still produce the right logits. The std of 0.2 (HF
uses 0.02) makes greedy generations vary from position to position instead of repeating one token.

`config_style` picks the config.json dialect. "hub" (the default) writes what checkpoints downloaded
from the Hub contain: `rope_theta` and `rope_scaling` at the top level and `torch_dtype`, with the
tokenizer's chat template inside tokenizer_config.json. "transformers" keeps what transformers 5's
save_pretrained writes: a `rope_parameters` dict holding rope_theta, `dtype`, and chat_template.jinja.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tandem.engine.tokenizer import (
    BUILTIN_BOS_TOKEN_ID,
    BUILTIN_EOS_TOKEN_ID,
    BUILTIN_PAD_TOKEN_ID,
    builtin_tokenizer_dir,
    builtin_vocab_size,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
CONFIG_STYLES = ("hub", "transformers")
INIT_STD = 0.2
NORM_WEIGHT_STD = 0.1  # norm weights are 1 + noise: near one, as in a trained model, yet not exactly one

_COMMON_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "initializer_range": INIT_STD,
    "bos_token_id": BUILTIN_BOS_TOKEN_ID,
    "eos_token_id": BUILTIN_EOS_TOKEN_ID,
    "pad_token_id": BUILTIN_PAD_TOKEN_ID,
}

_ARCH_CONFIGS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict[str, Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {
        "num_hidden_layers": 2,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    }),
    "mistral": (MistralConfig, MistralForCausalLM, {
        "num_hidden_layers": 2,
        "tie_word_embeddings": False,
        "sliding_window": None,
        "rope_theta": 1000000.0,
    }),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {
        "num_hidden_layers": 3,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
    }),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {
        "num_hidden_layers": 3,
        "tie_word_embeddings": False,
        "head_dim": 32,
        "rope_theta": 1000000.0,
    }),
}

_DEFAULT_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": BUILTIN_BOS_TOKEN_ID,
    "eos_token_id": BUILTIN_EOS_TOKEN_ID,
    "pad_token_id": BUILTIN_PAD_TOKEN_ID,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.9,
}


def make_checkpoint(
    arch: str,
    out_dir: Path,
    *,
    seed: int = 0,
    config_style: str = "hub",
    generation_config: dict[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random `arch` checkpoint to `out_dir`; `overrides` replace config fields."""
    return _write_checkpoint(arch, Path(out_dir), seed, config_style, generation_config, None, overrides)


def make_sharded_checkpoint(
    arch: str,
    out_dir: Path,
    *,
    max_shard_size: str | int = "200KB",
    seed: int = 0,
    config_style: str = "hub",
    generation_config: dict[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """Like `make_checkpoint`, split into 2+ safetensors shards with a model.safetensors.index.json."""
    out = _write_checkpoint(arch, Path(out_dir), seed, config_style, generation_config, max_shard_size, overrides)
    shards = sorted(out.glob("model-*.safetensors"))
    if len(shards) < 2 or not (out / "model.safetensors.index.json").is_file():
        raise ValueError(
            f"max_shard_size={max_shard_size!r} gave {len(shards)} shard(s) for {arch}; pass a smaller size"
        )
    return out


def build_model(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """The random model `make_checkpoint` saves, without writing it anywhere."""
    if arch not in _ARCH_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    config_class, model_class, arch_config = _ARCH_CONFIGS[arch]
    kwargs = {**_COMMON_CONFIG, "vocab_size": builtin_vocab_size(), **arch_config, **overrides}
    config = config_class(**kwargs)
    model = model_class(config).to(torch.float32).eval()
    _randomize_parameters(model, seed)
    return model


def _write_checkpoint(
    arch: str,
    out: Path,
    seed: int,
    config_style: str,
    generation_config: dict[str, Any] | None,
    max_shard_size: str | int | None,
    overrides: dict[str, Any],
) -> Path:
    if config_style not in CONFIG_STYLES:
        raise ValueError(f"unknown config_style {config_style!r}; choose one of {', '.join(CONFIG_STYLES)}")
    if any(out.glob("*.safetensors")):
        # Shards of an earlier checkpoint would sit next to the new weights and confuse loaders.
        raise ValueError(f"{out} already holds safetensors weights; pass an empty or new directory")
    model = build_model(arch, seed, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **save_kwargs)
    # Written after the model, whose save_pretrained writes a generation_config.json of its own.
    GenerationConfig(**{**_DEFAULT_GENERATION_CONFIG, **(generation_config or {})}).save_pretrained(out)
    if config_style == "hub":
        _rewrite_config_as_hub(out / "config.json")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(builtin_tokenizer_dir() / name, out / name)
    else:
        load_tokenizer(None).save_pretrained(out)
    logger.debug("wrote %s checkpoint (%s config) to %s", arch, config_style, out)
    return out


@torch.no_grad()
def _randomize_parameters(model: PreTrainedModel, seed: int) -> None:
    # Our own generator and draw order, so the weights do not depend on how transformers initializes.
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # tied weights appear once
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + NORM_WEIGHT_STD * noise)
        else:  # matrices and biases alike
            param.copy_(INIT_STD * noise)


def _rewrite_config_as_hub(config_path: Path) -> None:
    """Turn transformers 5's config.json keys into the ones Hub checkpoints use."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        rope = dict(rope)
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

