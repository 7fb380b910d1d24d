"""Everything about a model that can be known without building it: shapes, context length, stop
tokens and sampling defaults. The engine builds from it; the frontend validates requests with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tandem.engine.hub_cache import resolve_model_dir
from tandem.engine.model_config import ModelConfig, load_generation_defaults, load_model_config
from tandem.engine.presets import is_random_spec, preset_config
from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.tokenizer import BUILTIN_EOS_TOKEN_ID, builtin_vocab_size


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str                    # what the user asked for: a directory, a Hub id or random:<preset>
    model_dir: Path | None       # None for random:<preset>; a Hub id's cached snapshot
    config: ModelConfig          # eos_token_ids include generation_config.json's
    max_model_len: int
    generation_defaults: dict

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """Sampling defaults from generation_config.json, as vLLM applies them."""
        defaults = self.generation_defaults
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        chosen = {key: defaults[key] for key in keys if defaults.get(key) is not None}
        if defaults.get("do_sample") is False:
            chosen["temperature"] = 0.0
        return SamplingParams(**{**chosen, **overrides})


def describe_model(name: str, max_model_len: int | None = None) -> ModelInfo:
    """Raises ValueError naming what is wrong with `name` or `max_model_len`."""
    if is_random_spec(name):
        config = preset_config(name, builtin_vocab_size()).with_eos((BUILTIN_EOS_TOKEN_ID,))
        return ModelInfo(name, None, config, _max_model_len(config, max_model_len), {})
    model_dir = resolve_model_dir(name)  # a Hub id: its snapshot in the local cache
    config = load_model_config(model_dir)
    defaults = load_generation_defaults(model_dir)
    extra = defaults.get("eos_token_id")
    extra = [extra] if isinstance(extra, int) else list(extra or [])
    config = config.with_eos(tuple(dict.fromkeys([*config.eos_token_ids, *extra])))
    return ModelInfo(name, model_dir, config, _max_model_len(config, max_model_len), defaults)


def _max_model_len(config: ModelConfig, asked: int | None) -> int:
    limit = config.max_position_embeddings
    if config.sliding_window:
        # Attention here is full; within the window the two agree exactly.
        limit = min(limit, config.sliding_window)
    if asked is None:
        return limit
    if asked > limit:
        raise ValueError(f"max_model_len {asked} exceeds the model's limit of {limit} positions")
    return asked
