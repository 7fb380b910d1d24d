"""random:<preset> models have the real shapes of the models they stand for."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.models.decoder import DecoderModel
from tandem.engine.presets import preset_config
from tandem.engine.tokenizer import builtin_vocab_size

# Parameter counts of the real checkpoints, from their published configs.
EXPECTED_PARAMS = {
    "qwen3-0.6b": 596_049_920,
    "qwen2.5-1.5b": 1_543_714_304,
    "llama-3.1-8b": 8_030_261_248,
    "qwen2.5-7b": 7_615_616_512,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = DecoderModel(preset_config(f"random:{name}", builtin_vocab_size()))
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


def test_tiny_runs_on_the_cpu():
    from tandem import LLM, SamplingParams
    out = LLM(model="random:tiny").generate("A tokenizer that round-trips: 日本語 ✓",
                                            SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(out.outputs[0].token_ids) == 3
