"""Greedy tokens from tandem equal `transformers.generate`'s on the same checkpoint.

For each supported architecture, on a tiny random checkpoint: one request at a time, one mixed
batch, chunked prefill forced small, preemption forced by a tiny block pool, and a warm prefix cache.
"""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.engine.tokenizer import load_tokenizer
from tests.checkpoints import ARCHS, build_model, make_checkpoint

MAX_TOKENS = 16
SHARED = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch. "
PROMPTS = [
    "Hello, my name is",
    "def fibonacci(n):",
    SHARED + "What happens next?",
    SHARED + "Who owns the dog?",
    "Ünïcödé and emoji 🚀 work too, " * 2,
]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    """(arch, model dir, HF's greedy continuation of each prompt)."""
    arch = request.param
    model_dir = make_checkpoint(arch, tmp_path_factory.mktemp(arch))
    model = build_model(arch)
    tokenizer = load_tokenizer(str(model_dir))
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_TOKENS, pad_token_id=tokenizer.pad_token_id)
            expected.append(out[0, ids.shape[1]:].tolist())
    return arch, str(model_dir), expected


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_one_request_at_a_time(checkpoint):
    _, model_dir, expected = checkpoint
    llm = LLM(model=model_dir, block_size=4)
    got = [llm.generate(prompt, GREEDY)[0].outputs[0].token_ids for prompt in PROMPTS]
    assert got == expected
    assert any(len(set(e)) > 3 for e in expected)  # the reference is not degenerate


def test_one_mixed_batch(checkpoint):
    _, model_dir, expected = checkpoint
    llm = LLM(model=model_dir, block_size=4)
    assert tokens(llm.generate(PROMPTS, GREEDY)) == expected


def test_chunked_prefill_forced_small(checkpoint):
    _, model_dir, expected = checkpoint
    llm = LLM(model=model_dir, block_size=4, max_num_batched_tokens=7)
    assert tokens(llm.generate(PROMPTS, GREEDY)) == expected


def test_preemption_forced_by_a_tiny_block_pool(checkpoint):
    _, model_dir, expected = checkpoint
    llm = LLM(model=model_dir, block_size=4, num_kv_blocks=24)
    assert tokens(llm.generate(PROMPTS, GREEDY)) == expected
    assert llm.engine.scheduler.num_preemptions > 0


def test_warm_prefix_cache(checkpoint):
    _, model_dir, expected = checkpoint
    llm = LLM(model=model_dir, block_size=4)
    llm.generate(PROMPTS[2], GREEDY)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert tokens(outputs) == expected
    assert outputs[2].num_cached_tokens >= len(load_tokenizer(model_dir).encode(PROMPTS[2])) - 4
    assert outputs[3].num_cached_tokens >= 16  # shares the long first sentence with prompt 2
