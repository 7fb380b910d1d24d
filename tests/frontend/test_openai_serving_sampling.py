"""n = 2 with penalties and min_tokens through a real `tandem serve` (the shared drop-in server: a
prefill and a decode worker on a tiny llama checkpoint), checked against `transformers.generate`
with HF's repetition processor and OpenAI's presence/frequency formula on the same weights. The
prompt is long enough to be prefilled remotely, so the prefill worker's sampler and the frontend's
first-token check both see the parameters."""

from __future__ import annotations

import openai
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tandem.engine.tokenizer import load_tokenizer
from tests.checkpoints import build_model

PROMPT = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."
MAX_TOKENS = 8


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's formula over the generated tokens only: logit -= f * count + p * (count > 0)."""

    def __init__(self, num_prompt_tokens: int, presence: float, frequency: float):
        self.num_prompt_tokens, self.presence, self.frequency = num_prompt_tokens, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        output = input_ids[:, self.num_prompt_tokens:]
        counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@pytest.fixture(scope="module")
def client(dropin_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=dropin_server.http_url + "/v1", api_key="x", max_retries=0,
                         timeout=60)


def hf_greedy(model_dir: str, **penalties: float) -> str:
    tokenizer = load_tokenizer(model_dir)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    processors = LogitsProcessorList([PresenceFrequencyPenalty(
        ids.shape[1], penalties["presence_penalty"], penalties["frequency_penalty"])])
    with torch.no_grad():
        out = build_model("llama").generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
            min_new_tokens=MAX_TOKENS, repetition_penalty=penalties["repetition_penalty"],
            logits_processor=processors, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_two_penalized_greedy_choices_equal_transformers(client, dropin_server):
    penalties = {"presence_penalty": 0.8, "frequency_penalty": 0.6, "repetition_penalty": 1.7}
    out = client.completions.create(
        model=dropin_server.model, prompt=PROMPT, n=2, max_tokens=MAX_TOKENS, temperature=0,
        presence_penalty=penalties["presence_penalty"],
        frequency_penalty=penalties["frequency_penalty"],
        extra_body={"repetition_penalty": penalties["repetition_penalty"], "ignore_eos": True})
    expected = hf_greedy(dropin_server.model, **penalties)
    plain = client.completions.create(model=dropin_server.model, prompt=PROMPT,
                                      max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    assert [c.text for c in out.choices] == [expected, expected]
    assert expected != plain   # the penalties changed the output
    assert out.usage.completion_tokens == 2 * MAX_TOKENS


def test_min_tokens_holds_back_a_stop_token(client, dropin_server):
    # A bias of 100 makes token 42 the certain choice; it is also the request's stop token.
    forced = {"logit_bias": {"42": 100}, "stop_token_ids": [42]}
    stopped = client.completions.create(model=dropin_server.model, prompt=PROMPT, max_tokens=8,
                                        temperature=0.8, extra_body=forced)
    assert (stopped.choices[0].finish_reason, stopped.choices[0].stop_reason) == ("stop", 42)
    assert stopped.usage.completion_tokens == 1
    held = client.completions.create(model=dropin_server.model, prompt=PROMPT, n=2, max_tokens=8,
                                     temperature=0.8, extra_body={**forced, "min_tokens": 4})
    assert [(c.finish_reason, c.stop_reason) for c in held.choices] == [("stop", 42)] * 2
    assert held.usage.completion_tokens == 2 * 5   # 4 held back, then the stop token
