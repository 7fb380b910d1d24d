"""The engine on a GPU: Triton kernels, CUDA graphs and GPU sampling give the tokens HF gives."""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.engine.tokenizer import load_tokenizer
from tests.checkpoints import build_model, make_checkpoint

pytestmark = pytest.mark.gpu

PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog " * 5,
           "def fibonacci(n):"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3")))


def hf_greedy(model_dir: str) -> list[list[int]]:
    model = build_model("qwen3")
    tokenizer = load_tokenizer(model_dir)
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_fp32_on_gpu_with_graphs_equals_hf(model_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    expected = hf_greedy(model_dir)
    llm = LLM(model=model_dir, device="cuda", dtype="float32", block_size=16, num_kv_blocks=64)
    assert llm.engine.runner.graphs is not None
    assert tokens(llm) == expected


def test_graphs_and_eager_agree_in_bf16(model_dir):
    graphs = LLM(model=model_dir, device="cuda", block_size=16, num_kv_blocks=64)
    eager = LLM(model=model_dir, device="cuda", block_size=16, num_kv_blocks=64,
                enforce_eager=True)
    assert graphs.engine.dtype == torch.bfloat16
    assert tokens(graphs) == tokens(eager)


def test_seeded_sampling_on_gpu_is_reproducible(model_dir):
    llm = LLM(model=model_dir, device="cuda", block_size=16, num_kv_blocks=64)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)
    first = llm.generate(PROMPTS, params)
    again = llm.generate(PROMPTS[::-1], params)[::-1]
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]


def test_steps_ahead_with_graphs_equal_one_step_at_a_time(model_dir):
    from tests.engine.test_lookahead import PROMPTS as IDS, count_ahead, one_at_a_time

    llm = LLM(model=model_dir, device="cuda", block_size=16, num_kv_blocks=64)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 40, 19)]
    expected = one_at_a_time(llm, IDS, params)
    calls = count_ahead(llm)
    got = [o.outputs[0].token_ids for o in llm.generate(IDS, params)]
    assert got == expected and calls[0] > 0
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_kv_sizing_with_a_step_budget_past_the_context_length(model_dir):
    # Sizing the KV cache runs one step of the whole token budget; its positions run past a
    # max_model_len shorter than the budget and must stay inside the rotary table.
    llm = LLM(model=model_dir, device="cuda", max_model_len=96, max_num_batched_tokens=1024,
              gpu_memory_utilization=0.3)
    assert llm.engine.num_blocks > 0
    assert len(tokens(llm)[0]) == 16


def test_a_batch_past_sixteen_decodes_in_graphs_as_it_does_eagerly(model_dir):
    """Decode graphs up to pdl.DECODE_MAX_BATCH sequences launch programmatically: a batch of
    40 (the 48 bucket) gives the eager step's greedy tokens (fp32: no rounding gap that could flip
    one)."""
    from tandem.engine.kernels import pdl

    torch.backends.cuda.matmul.allow_tf32 = False
    ids = [[(7 * i + j) % 200 + 3 for j in range(5 + 3 * i)] for i in range(40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = []
    for eager in (False, True):
        llm = LLM(model=model_dir, device="cuda", dtype="float32", block_size=16,
                  num_kv_blocks=512, enforce_eager=eager)
        outs.append([o.outputs[0].token_ids for o in llm.generate(ids, params)])
    assert 40 <= pdl.DECODE_MAX_BATCH
    assert outs[0] == outs[1]
