"""Model loading: sharded checkpoints, generation defaults, and clear errors for bad directories."""

from __future__ import annotations

import json

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tests.checkpoints import make_checkpoint, make_sharded_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_sharded_checkpoint_gives_the_same_tokens(tmp_path):
    single = make_checkpoint("llama", tmp_path / "single")
    sharded = make_sharded_checkpoint("llama", tmp_path / "sharded")
    prompt = "Sharded weights load the same"
    a = LLM(model=str(single)).generate(prompt, GREEDY)[0].outputs[0].token_ids
    b = LLM(model=str(sharded)).generate(prompt, GREEDY)[0].outputs[0].token_ids
    assert a == b


def test_transformers5_config_style_loads(tmp_path):
    hub = make_checkpoint("qwen3", tmp_path / "hub")
    new = make_checkpoint("qwen3", tmp_path / "new", config_style="transformers")
    prompt = "Both config dialects"
    assert (LLM(model=str(hub)).generate(prompt, GREEDY)[0].outputs[0].token_ids
            == LLM(model=str(new)).generate(prompt, GREEDY)[0].outputs[0].token_ids)


def test_generation_config_supplies_default_sampling(tmp_path):
    model_dir = make_checkpoint("llama", tmp_path / "m")
    defaults = LLMEngine(EngineConfig(model=str(model_dir))).default_sampling_params()
    assert defaults.temperature == 0.7 and defaults.top_p == 0.9


def test_unsupported_architecture_is_named(tmp_path):
    model_dir = make_checkpoint("llama", tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        LLMEngine(EngineConfig(model=str(model_dir)))


@pytest.mark.parametrize("damage, message", [
    ("no_config", "no config.json"),
    ("bad_json", "not valid JSON"),
    ("no_weights", "has no weights"),
    ("missing_tensor", "lacks 1 tensors: layers.0.mlp.down_proj.weight"),
    ("wrong_shape", "has shape"),
])
def test_malformed_directories_fail_with_what_is_wrong(tmp_path, damage, message):
    from safetensors.torch import load_file, save_file
    model_dir = make_checkpoint("llama", tmp_path / "m")
    weights = model_dir / "model.safetensors"
    if damage == "no_config":
        (model_dir / "config.json").unlink()
    elif damage == "bad_json":
        (model_dir / "config.json").write_text("{not json")
    elif damage == "no_weights":
        weights.unlink()
    else:
        tensors = load_file(weights)
        name = "model.layers.0.mlp.down_proj.weight"
        if damage == "missing_tensor":
            del tensors[name]
        else:
            tensors[name] = torch.zeros(3, 3)
        save_file(tensors, weights)
    with pytest.raises(ValueError, match=message):
        LLMEngine(EngineConfig(model=str(model_dir)))


def test_not_a_directory_nor_a_preset():
    with pytest.raises(ValueError, match="neither a directory"):
        LLMEngine(EngineConfig(model="/no/such/model"))
    with pytest.raises(ValueError, match="unknown random preset"):
        LLMEngine(EngineConfig(model="random:nope"))


def test_a_random_model_generates_ids_the_builtin_tokenizer_has():
    # random:<preset> models have their real vocabulary (128k ids for llama) but the built-in
    # tokenizer's 2048 ids: a generated id past those would stream as no text at all.
    from tandem.engine.loader import build_model
    from tandem.engine.model_config import ModelConfig
    from tandem.engine.tokenizer import BUILTIN_VOCAB_SIZE

    config = ModelConfig(architecture="LlamaForCausalLM", hidden_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                         vocab_size=4 * BUILTIN_VOCAB_SIZE, max_position_embeddings=64)
    model = build_model(config, torch.device("cpu"), torch.float32, None, 64, seed=3)
    head = model.lm_head.weight
    assert head[BUILTIN_VOCAB_SIZE:].abs().sum() == 0 and head[:BUILTIN_VOCAB_SIZE].abs().min() > 0
    hidden = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    assert int((hidden @ head.T).argmax(dim=-1).max()) < BUILTIN_VOCAB_SIZE
