"""What a request's own parameters do to its logits before temperature: bias, min_tokens, penalties.

The semantics are vLLM's, which match OpenAI's and Hugging Face's where those define them:

- `logit_bias` adds each listed token's bias to its logit (OpenAI's `logit_bias`).
- `min_tokens` sets eos and the request's stop tokens to -inf while the output is shorter than
  `min_tokens` (HF's `MinNewTokensLengthLogitsProcessor`).
- `repetition_penalty` r divides a positive logit by r and multiplies a negative one by r, for every
  token that occurs in the prompt or the output (HF's `RepetitionPenaltyLogitsProcessor`).
- `frequency_penalty` f and `presence_penalty` p subtract `f * count + p * (count > 0)`, where count is
  how often the token occurs in the output alone (OpenAI's formula).

Only the rows whose parameters ask for any of this are touched, and the sampler calls this module
only when some row does: a batch without these parameters pays one Python check per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.contracts.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenHistory:
    """The tokens a sequence holds so far, which the penalties and min_tokens read."""
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


def process_logits(logits: torch.Tensor, params: list[SamplingParams],
                   histories: list[TokenHistory], eos_token_ids: Sequence[int]) -> torch.Tensor:
    """logits: (num_rows, vocab) fp32; a new tensor with each row's bias, mask and penalties."""
    rows = [i for i, p in enumerate(params) if p.changes_logits]
    if not rows:
        return logits
    logits = logits.clone()
    _add_logit_bias(logits, rows, params)
    _mask_early_stops(logits, rows, params, histories, eos_token_ids)
    penalized = [i for i in rows if params[i].has_penalties]
    if penalized:
        index = torch.tensor(penalized, device=logits.device)
        logits[index] = apply_penalties(logits[index], [params[i] for i in penalized],
                                        [histories[i] for i in penalized])
    return logits


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    histories: list[TokenHistory]) -> torch.Tensor:
    """logits: (num_rows, vocab); repetition, then frequency and presence penalties per row."""
    num_rows, vocab = logits.shape
    output_counts = _token_counts([h.output_token_ids for h in histories], vocab, logits.device)
    prompt_counts = _token_counts([h.prompt_token_ids for h in histories], vocab, logits.device)
    values = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
                           for p in params], dtype=logits.dtype).to(logits.device)
    repetition, frequency, presence = values[:, :1], values[:, 1:2], values[:, 2:]
    seen = (output_counts > 0) | (prompt_counts > 0)
    penalty = torch.where(seen, repetition, torch.ones_like(repetition))   # (num_rows, vocab)
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - frequency * output_counts
    return logits - presence * (output_counts > 0).to(logits.dtype)


def _token_counts(token_lists: list[Sequence[int]], vocab: int, device: torch.device
                  ) -> torch.Tensor:
    """(num_rows, vocab) fp32: how often each token occurs in each row's list."""
    width = max((len(ids) for ids in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    if width == 0:
        return counts[:, :vocab]
    # Rows are padded with the extra column `vocab`, which is dropped after counting.
    padded = torch.full((len(token_lists), width), vocab, dtype=torch.int64)
    for row, ids in enumerate(token_lists):
        padded[row, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.int64).clamp_(0, vocab)
    padded = padded.to(device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def _add_logit_bias(logits: torch.Tensor, rows: list[int], params: list[SamplingParams]) -> None:
    vocab = logits.shape[-1]
    entries = [(i, t, b) for i in rows for t, b in params[i].logit_bias.items() if t < vocab]
    if not entries:
        return
    index_rows, index_cols, biases = zip(*entries)
    logits.index_put_((torch.tensor(index_rows, device=logits.device),
                       torch.tensor(index_cols, device=logits.device)),
                      torch.tensor(biases, dtype=logits.dtype).to(logits.device), accumulate=True)


def _mask_early_stops(logits: torch.Tensor, rows: list[int], params: list[SamplingParams],
                      histories: list[TokenHistory], eos_token_ids: Sequence[int]) -> None:
    """Below min_tokens, eos and the stop tokens cannot be sampled at all."""
    vocab = logits.shape[-1]
    cells = []
    for i in rows:
        if len(histories[i].output_token_ids) >= params[i].min_tokens:
            continue
        stops = set(params[i].stop_token_ids)
        if not params[i].ignore_eos:
            stops.update(eos_token_ids)
        cells += [(i, t) for t in sorted(stops) if t < vocab]
    if cells:
        index_rows, index_cols = zip(*cells)
        logits[torch.tensor(index_rows, device=logits.device),
               torch.tensor(index_cols, device=logits.device)] = float("-inf")
