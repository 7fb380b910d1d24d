"""How the frontend presents its model to clients, as vLLM's serving flags set it: the names it
answers to (`--served-model-name`), the chat template (`--chat-template`) and the sampling defaults
(`--generation-config`).

- Served names: a request's `model` may be any of them, `/v1/models` lists them all, and responses
  carry the first. Unset, the model answers to `--model` as given. Workers still register under
  `--model`: the names are for clients, not for matching workers to the frontend.
- Chat template: a file, or the Jinja text itself (vLLM accepts both; a value that names no file
  and holds no Jinja markup is taken for a mistyped path, not a template that would render the
  same text for every conversation). It replaces the tokenizer's own.
- Generation config: `auto` applies the model's generation_config.json (temperature, top_p, ...
  for fields a request leaves unset); `vllm` or `none` ignore it (vLLM's neutral defaults); a path
  (a generation_config.json, or a folder holding one) applies that file instead. Stop tokens from
  the model's own file still apply: they describe the model, not a sampling preference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from tandem.engine.model_info import ModelInfo

NEUTRAL_GENERATION_CONFIGS = ("vllm", "none")
_JINJA_MARKERS = ("{{", "{%")


@dataclass(frozen=True, slots=True)
class ModelServingConfig:
    served_model_names: tuple[str, ...] = ()  # (): the model as --model names it
    chat_template: str | None = None          # a file or inline Jinja; None: the tokenizer's
    generation_config: str = "auto"           # auto | vllm | none | a path

    def __post_init__(self) -> None:
        if any(not name.strip() for name in self.served_model_names):
            raise ValueError(f"served_model_name: names must be non-empty, got "
                             f"{list(self.served_model_names)}")
        if self.chat_template is not None:
            load_chat_template(self.chat_template)  # a missing file fails at start, not per chat
        source = self.generation_config
        if source != "auto" and source not in NEUTRAL_GENERATION_CONFIGS:
            _generation_config_file(source)


def served_names(config: ModelServingConfig, model: str) -> tuple[str, ...]:
    """The names clients may use, the one responses carry first."""
    return config.served_model_names or (model,)


def load_chat_template(value: str) -> str:
    """The template text of a file path or of the inline template `value`."""
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if not any(marker in value for marker in _JINJA_MARKERS):
        raise ValueError(f"chat_template {value!r} is neither a file nor a Jinja template "
                         "(no {{ }} or {% %} in it)")
    return value


def generation_defaults(config: ModelServingConfig, model: ModelInfo) -> dict:
    """The sampling defaults `--generation-config` chooses for `model`."""
    if config.generation_config == "auto":
        return model.generation_defaults
    if config.generation_config in NEUTRAL_GENERATION_CONFIGS:
        return {}
    path = _generation_config_file(config.generation_config)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"generation_config {path} is not valid JSON: {err}") from None


def serve_model(config: ModelServingConfig, model: ModelInfo, tokenizer) -> ModelInfo:
    """`model` with the chosen sampling defaults, and `tokenizer` with the chosen chat template."""
    if config.chat_template is not None:
        tokenizer.chat_template = load_chat_template(config.chat_template)
    return replace(model, generation_defaults=generation_defaults(config, model))


def _generation_config_file(source: str) -> Path:
    path = Path(source)
    if path.is_dir():
        path = path / "generation_config.json"
    if not path.is_file():
        raise ValueError(f"generation_config {source!r} is not auto, vllm, none, a "
                         "generation_config.json or a folder holding one")
    return path
