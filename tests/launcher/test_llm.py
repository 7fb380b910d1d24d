"""The offline API on the built-in tiny model: prompts, seeds, stop strings, logprobs, CLI."""

from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams
from tandem.launcher.cli import main


@pytest.fixture(scope="module")
def llm():
    return LLM(model="random:tiny")


def test_prompts_as_text_and_token_ids(llm):
    text = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=5))[0]
    ids = llm.generate([text.prompt_token_ids], SamplingParams(temperature=0, max_tokens=5))[0]
    assert ids.prompt is None and ids.prompt_token_ids == text.prompt_token_ids
    assert ids.outputs[0].token_ids == text.outputs[0].token_ids
    assert len(text.outputs[0].token_ids) == 5 and text.outputs[0].finish_reason == "length"
    assert text.outputs[0].text == llm.tokenizer.decode(text.outputs[0].token_ids)


def test_same_seed_same_tokens_in_any_batch(llm):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    alone = llm.generate("Seeded", params)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = llm.generate(["Other", "Seeded", "More"], [unseeded, params, unseeded])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, seed=8, max_tokens=12, ignore_eos=True)
    assert llm.generate("Seeded", other_seed)[0].outputs[0].token_ids != alone


def test_stop_string_cuts_text_and_ends_generation(llm):
    free = llm.generate("Stop here", SamplingParams(temperature=0, max_tokens=30,
                                                    ignore_eos=True))[0].outputs[0]
    stop = free.text[5:8]
    assert stop.strip(), free.text
    cut = llm.generate("Stop here", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                   stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free.text[:free.text.index(stop)]
    assert len(cut.token_ids) < len(free.token_ids)


def test_stop_token_ids_and_logprobs(llm):
    free = llm.generate("Tokens", SamplingParams(temperature=0, max_tokens=10,
                                                 ignore_eos=True))[0].outputs[0]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3,
                            stop_token_ids=[free.token_ids[4]])
    out = llm.generate("Tokens", params)[0].outputs[0]
    first = free.token_ids.index(free.token_ids[4])
    assert out.token_ids == free.token_ids[:first + 1] and out.stop_reason == free.token_ids[4]
    assert len(out.logprobs) == len(out.token_ids)
    for lp in out.logprobs:
        assert len(lp.top_logprobs) == 3 and lp.logprob == max(lp.top_logprobs.values())


def test_cli_generate(capsys):
    assert main(["generate", "--max-tokens", "4", "Hi there"]) == 0
    out = capsys.readouterr().out
    assert "prompt: 'Hi there'" in out and "tokens: 4" in out


def test_cli_reports_bad_input(capsys):
    assert main(["generate", "--model", "random:nope", "x"]) == 2
    assert "unknown random preset" in capsys.readouterr().err
