"""Text for the benchmark: the tokenizer that measures real-text prompts and the decoding of
token-id prompts for backends that send text (`openai-chat`).

The tokenizer is `--tokenizer` (a local model directory, a Hub id already in the local Hugging Face
cache, or `builtin` for tandem's own, which `random:<preset>` models use), else `--model` when that
names a local directory, which is how a server started with `--model PATH` names its model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from tandem.bench.records import BenchRequest
from tandem.engine.hub_cache import resolve_model_dir
from tandem.engine.tokenizer import load_tokenizer

BUILTIN = "builtin"


def bench_tokenizer_name(tokenizer: str | None, model: str | None) -> str | None:
    """The tokenizer the flags name, or None when they name none."""
    if tokenizer:
        return tokenizer
    if model and os.path.isdir(model):
        return model
    return None


def load_bench_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == BUILTIN:
        return load_tokenizer(None)
    return load_tokenizer(str(resolve_model_dir(name)))


def encoder(tokenizer: PreTrainedTokenizerBase):
    """Text -> token ids, without the special tokens a chat template or the server adds."""
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def with_prompt_texts(requests: Sequence[BenchRequest],
                      tokenizer: PreTrainedTokenizerBase) -> list[BenchRequest]:
    """Each request with text, decoding the token ids of those that have none."""
    return [request if request.prompt_text is not None else
            replace(request, prompt_text=tokenizer.decode(list(request.prompt_token_ids)))
            for request in requests]
