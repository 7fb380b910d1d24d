"""Builds a model on its device: from an HF directory (safetensors) or with random weights.

The model is first built on the meta device, so no memory is touched, then materialised directly on
the target device and filled, either from the checkpoint's tensors or from a seeded normal
distribution. HF's separate q/k/v and gate/up tensors are copied into slices of the fused weights.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from tandem.engine.model_config import ModelConfig
from tandem.engine.models.decoder import DecoderModel
from tandem.engine.tokenizer import BUILTIN_VOCAB_SIZE

logger = logging.getLogger(__name__)

RANDOM_INIT_STD = 0.02
_FUSED = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|gate|up)_proj\.(weight|bias)$")


def build_model(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                model_dir: Path | None, max_positions: int, seed: int = 0) -> DecoderModel:
    with torch.device("meta"):
        model = DecoderModel(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:  # to_empty materialises the shared tensor twice
        model.lm_head.weight = model.embed_tokens.weight
    if model_dir is None:
        init_random_weights(model, seed)
    else:
        load_weights(model, model_dir)
    model.init_rope(max_positions, device)
    return model.eval()


@torch.no_grad()
def init_random_weights(model: DecoderModel, seed: int) -> None:
    """Random weights at the model's shapes. A random model is served with the built-in tokenizer,
    whose ids are the first BUILTIN_VOCAB_SIZE of a large vocabulary: the LM head's rows past them
    are zero, so greedy decoding picks an id the tokenizer has (the largest of 2048 random logits
    is positive) and every generated token streams as text, as a real model's would; the head is
    as large as the real model's, so a step costs the same."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, RANDOM_INIT_STD, generator=generator)
    model.lm_head.weight[BUILTIN_VOCAB_SIZE:].zero_()


def checkpoint_files(model_dir: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index} is malformed: {err}") from err
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{model_dir}: shards named in the index are missing: {missing}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"{model_dir} has no weights: expected model.safetensors or "
                     "model.safetensors.index.json with its shards")


def iter_checkpoint(model_dir: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def load_weights(model: DecoderModel, model_dir: Path) -> None:
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    expected = {name: _num_slices(name) for name in params}
    seen: dict[str, int] = {}
    for hf_name, tensor in iter_checkpoint(model_dir, device):
        if "rotary_emb" in hf_name or (model.config.tie_word_embeddings
                                       and hf_name == "lm_head.weight"):
            continue
        name, row_slice = _target(model.config, hf_name.removeprefix("model."))
        if name not in params:
            raise ValueError(f"{model_dir}: unexpected tensor {hf_name!r} for "
                             f"{model.config.architecture}")
        target = params[name] if row_slice is None else params[name][row_slice]
        if target.shape != tensor.shape:
            raise ValueError(f"{model_dir}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                             f"the config implies {tuple(target.shape)}")
        target.copy_(tensor)
        seen[name] = seen.get(name, 0) + 1
    if model.config.tie_word_embeddings:
        seen["lm_head.weight"] = seen.get("embed_tokens.weight", 0)
    missing = sorted(name for name, count in expected.items() if seen.get(name, 0) < count)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensors: {shown}")


def _num_slices(name: str) -> int:
    if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
        return 3
    if name.endswith("gate_up_proj.weight"):
        return 2
    return 1


def _target(config: ModelConfig, name: str) -> tuple[str, slice | None]:
    """Our parameter name for an HF tensor name, and the rows of it that the tensor fills."""
    match = _FUSED.search(name)
    if match is None:
        return name, None
    layer, block, proj, kind = match.groups()
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv),
            "gate": slice(0, config.intermediate_size),
            "up": slice(config.intermediate_size, 2 * config.intermediate_size)}[proj]
    fused = "qkv_proj" if block == "self_attn" else "gate_up_proj"
    return f"layers.{layer}.{block}.{fused}.{kind}", rows
