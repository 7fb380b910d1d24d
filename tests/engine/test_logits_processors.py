"""Penalties, logit_bias and min_tokens: against Hugging Face's logits processors where the
semantics are the same, and against OpenAI's formula for presence and frequency penalties."""

from __future__ import annotations

import torch
from transformers import (MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          SequenceBiasLogitsProcessor)

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.logits_processors import TokenHistory, apply_penalties, process_logits
from tandem.engine.model_runner import _histories
from tandem.engine.sampler import Sampler
from tandem.engine.sequence import Sequence
from tandem.engine.stop_rule import finish_after_token
from tandem.engine.sequence import FinishReason

VOCAB = 32
EOS = (2,)


def random_case(seed: int, num_rows: int = 3, num_prompt: int = 7, num_output: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, VOCAB, generator=g) * 3
    prompt = torch.randint(0, VOCAB, (num_rows, num_prompt), generator=g)
    output = torch.randint(0, VOCAB, (num_rows, num_output), generator=g)
    histories = [TokenHistory(prompt[i].tolist(), output[i].tolist()) for i in range(num_rows)]
    return logits, prompt, output, histories


def test_repetition_penalty_equals_hf_over_prompt_and_output():
    for seed in range(5):
        logits, prompt, output, histories = random_case(seed)
        for penalty in (0.7, 1.3, 2.0):
            ours = apply_penalties(logits, [SamplingParams(repetition_penalty=penalty)] * 3,
                                   histories)
            theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.cat([prompt, output], 1),
                                                               logits.clone())
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_presence_and_frequency_penalties_count_the_output_only():
    logits, _, output, histories = random_case(11)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    ours = apply_penalties(logits, [params] * 3, histories)
    expected = logits.clone()
    for row in range(3):
        counts = torch.bincount(output[row], minlength=VOCAB).float()
        expected[row] -= 0.25 * counts + 0.5 * (counts > 0).float()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    prompt_only = [t for t in histories[0].prompt_token_ids if t not in histories[0].output_token_ids]
    assert ours[0, prompt_only[0]] == logits[0, prompt_only[0]]


def test_logit_bias_equals_hf_sequence_bias():
    logits, prompt, _, histories = random_case(3)
    bias = {5: 4.5, 17: -100.0, 31: 0.25}
    ours = process_logits(logits, [SamplingParams(logit_bias=bias)] * 3, histories, EOS)
    hf = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
    torch.testing.assert_close(ours, hf(prompt, logits.clone()), rtol=0, atol=1e-6)


def test_min_tokens_equals_hf_min_new_tokens():
    logits, prompt, output, _ = random_case(4)
    stop_ids = [9]
    params = SamplingParams(min_tokens=4, stop_token_ids=stop_ids)
    hf = MinNewTokensLengthLogitsProcessor(prompt.shape[1], 4, [*EOS, *stop_ids])
    for num_output in (0, 3, 4, 5):
        histories = [TokenHistory(prompt[i].tolist(), output[i, :num_output].tolist())
                     for i in range(3)]
        ours = process_logits(logits, [params] * 3, histories, EOS)
        theirs = hf(torch.cat([prompt, output[:, :num_output]], 1), logits.clone())
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert bool(torch.isinf(ours[:, 2]).all()) == (num_output < 4)


def test_only_rows_that_ask_are_changed_and_greedy_follows_the_changed_logits():
    logits = torch.zeros(2, VOCAB)
    logits[:, 6] = 1.0
    plain, biased = SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={8: 5.0})
    histories = [TokenHistory([1], []), TokenHistory([1], [])]
    out = Sampler(torch.device("cpu"), 0, EOS)(logits, [plain, biased], [None, None], histories)
    assert out.token_ids == [6, 8]


def test_penalties_keep_logprobs_of_the_raw_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    params = SamplingParams(temperature=0, repetition_penalty=4.0, logprobs=0)
    out = Sampler(torch.device("cpu"), 0)(logits, [params], [None], [TokenHistory([0], [])])
    assert out.token_ids == [1]   # log 0.6 * 4 < log 0.3: the seen token drops below the next
    assert abs(out.logprobs[0][0] - torch.log(torch.tensor(0.3)).item()) < 1e-6


def test_sampled_rows_never_draw_a_masked_eos():
    sampler = Sampler(torch.device("cpu"), 0, EOS)
    logits = torch.zeros(200, VOCAB)
    logits[:, 2] = 10.0   # eos is nearly certain
    params = [SamplingParams(temperature=1.0, min_tokens=1)] * 200
    out = sampler(logits, params, [None] * 200, [TokenHistory([1], [])] * 200)
    assert 2 not in out.token_ids


def test_no_history_is_built_without_penalties():
    plain = Sequence("a", [1, 2], SamplingParams(), 4)
    assert _histories([plain]) is None
    penalized = Sequence("b", [1, 2], SamplingParams(presence_penalty=0.5), 4)
    penalized.append_token(3)
    histories = _histories([plain, penalized])
    assert histories[1] == TokenHistory([1, 2], [3])


def test_stop_rule_waits_for_min_tokens():
    params = SamplingParams(min_tokens=3, stop_token_ids=[9])
    assert finish_after_token(params, 2, 2, 10, {2}, 100) is None
    assert finish_after_token(params, 9, 2, 10, {2}, 100) is None
    assert finish_after_token(params, 2, 3, 10, {2}, 100) == FinishReason.STOP
