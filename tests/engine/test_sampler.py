"""Sampler: greedy, filters, seeds and logprobs, on exact small distributions."""

from __future__ import annotations

import math

import pytest
import torch

from tandem.engine.sampler import Sampler
from tandem.contracts.sampling_params import SamplingParams

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def draw(params: SamplingParams, n: int = 400, seed: int = 0) -> list[int]:
    sampler = Sampler(torch.device("cpu"), seed)
    logits = LOGITS.repeat(n, 1)
    gens = [sampler.request_generator(params) for _ in range(n)]
    return sampler(logits, [params] * n, gens).token_ids


def test_greedy_takes_the_argmax():
    assert draw(SamplingParams(temperature=0), n=3) == [0, 0, 0]


def test_top_k_top_p_min_p_exclude_the_tail():
    assert set(draw(SamplingParams(temperature=1.0, top_k=2))) == {0, 1}
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 covers it
    assert set(draw(SamplingParams(temperature=1.0, min_p=0.5))) == {0, 1}  # 0.3 >= 0.25 > 0.15
    assert set(draw(SamplingParams(temperature=1.0))) == {0, 1, 2, 3}


def test_sampling_follows_the_distribution():
    tokens = draw(SamplingParams(temperature=1.0), n=4000)
    frequency = tokens.count(0) / len(tokens)
    assert abs(frequency - 0.5) < 0.04


def test_same_seed_same_tokens_whatever_the_batch():
    params = SamplingParams(temperature=1.0, seed=1234)
    sampler = Sampler(torch.device("cpu"), 0)
    logits = torch.randn(1, 50)
    a = [sampler(logits, [params], [sampler.request_generator(params)]).token_ids[0]]
    gen = sampler.request_generator(params)
    seq_a = [sampler(logits, [params], [gen]).token_ids[0] for _ in range(20)]
    gen = sampler.request_generator(params)
    other = SamplingParams(temperature=1.0)
    seq_b = [sampler(logits.repeat(2, 1), [other, params], [None, gen]).token_ids[1]
             for _ in range(20)]
    assert seq_a == seq_b and seq_a[0] == a[0]
    assert len(set(seq_a)) > 1  # it really samples


def test_logprobs_of_sampled_token_and_top_n():
    sampler = Sampler(torch.device("cpu"), 0)
    out = sampler(LOGITS, [SamplingParams(temperature=0, logprobs=2)], [None])
    chosen, top = out.logprobs[0]
    assert chosen == pytest.approx(math.log(0.5), abs=1e-5)
    assert list(top) == [0, 1]
    assert top[1] == pytest.approx(math.log(0.3), abs=1e-5)
    assert sampler(LOGITS, [SamplingParams(temperature=0)], [None]).logprobs == [None]


def test_invalid_parameters_are_refused():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=2),
                dict(max_tokens=0), dict(logprobs=21), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
