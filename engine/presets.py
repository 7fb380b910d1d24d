"""`random:<preset>`: models with random weights at real shapes, built in memory with no files.

They exist to measure speed at real sizes and to test everything that does not depend on what the
weights say. `tiny` is small enough to serve on a CPU and is the built-in default model. All presets
use the built-in tokenizer, which round-trips any text; its ids are a small subset of the vocab.
"""

from __future__ import annotations

from tandem.engine.model_config import ModelConfig

RANDOM_PREFIX = "random:"

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _presets(tiny_vocab_size: int) -> dict[str, ModelConfig]:
    return {
        "tiny": ModelConfig(
            architecture="LlamaForCausalLM", hidden_size=128, num_layers=4, num_heads=4,
            num_kv_heads=2, head_dim=32, intermediate_size=256, vocab_size=tiny_vocab_size,
            max_position_embeddings=4096),
        "qwen3-0.6b": ModelConfig(
            architecture="Qwen3ForCausalLM", hidden_size=1024, num_layers=28, num_heads=16,
            num_kv_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
            max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True,
            qk_norm=True),
        "qwen2.5-1.5b": ModelConfig(
            architecture="Qwen2ForCausalLM", hidden_size=1536, num_layers=28, num_heads=12,
            num_kv_heads=2, head_dim=128, intermediate_size=8960, vocab_size=151936,
            max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
            qkv_bias=True),
        "llama-3.1-8b": ModelConfig(
            architecture="LlamaForCausalLM", hidden_size=4096, num_layers=32, num_heads=32,
            num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
            max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
            rope_scaling=LLAMA3_SCALING),
        "qwen2.5-7b": ModelConfig(
            architecture="Qwen2ForCausalLM", hidden_size=3584, num_layers=28, num_heads=28,
            num_kv_heads=4, head_dim=128, intermediate_size=18944, vocab_size=152064,
            max_position_embeddings=32768, rope_theta=1e6, qkv_bias=True),
    }


def is_random_spec(model: str) -> bool:
    return model.startswith(RANDOM_PREFIX)


def preset_config(model: str, tiny_vocab_size: int) -> ModelConfig:
    name = model.removeprefix(RANDOM_PREFIX)
    presets = _presets(tiny_vocab_size)
    if name not in presets:
        raise ValueError(f"unknown random preset {name!r}; presets: {', '.join(presets)}")
    return presets[name]
