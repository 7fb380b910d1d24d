"""A step's rows may run in another order than scheduled (a mixed step runs its decodes first):
each sampled token still reaches its own sequence."""

from __future__ import annotations

from tandem import LLM, SamplingParams
from tandem.engine import model_runner

PROMPTS = [[5, 9, 14, 3, 27, 8, 8, 1, 40], [8, 1, 1, 2], [30, 31, 17, 2, 2, 2, 2, 9, 10, 11, 12]]


def test_rows_run_in_another_order_give_the_same_tokens(monkeypatch):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 11, 8)]
    options = dict(model="random:tiny", block_size=4, max_num_batched_tokens=7)
    expected = [o.outputs[0].token_ids for o in LLM(**options).generate(PROMPTS, params)]
    reordered = []

    def reversed_rows(batch):
        if len(batch.seqs) < 2:
            return None
        reordered.append(len(batch.seqs))
        return list(range(len(batch.seqs)))[::-1]

    monkeypatch.setattr(model_runner, "decode_rows_first", reversed_rows)
    got = [o.outputs[0].token_ids for o in LLM(**options).generate(PROMPTS, params)]
    assert reordered and got == expected
