"""Sampling a batch of next tokens on the logits' device.

Temperature, top-k, top-p and min-p filter each row; then a token is drawn by the exponential race
(argmax of p / E with E ~ Exp(1)), which equals sampling from p and needs no host sync or
`multinomial`. A request with a seed draws its noise from its own generator, so its tokens do not
depend on what else is in the batch. Greedy rows take the argmax of the raw logits.

Before any of that, rows whose requests set penalties, `logit_bias` or `min_tokens` have their logits
changed by `logits_processors` (greedy rows too: their argmax is of the changed logits). Logprobs are
those of the model's raw distribution (before penalties, temperature and filters), as in vLLM.
Then rows with structured output have every token their grammar forbids set to -inf
(engine/structured_output.py), so neither argmax nor the race can pick one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.logits_processors import TokenHistory, process_logits
from tandem.engine.structured_output import TokenMask, apply_token_mask


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]] | None]  # (sampled logprob, top-n) per row


@dataclass(slots=True)
class PendingTokens:
    """A batch's sampled tokens on their way to the host: the device may still be computing them."""
    token_ids: torch.Tensor           # (num_rows,) on the device
    host_token_ids: torch.Tensor      # (num_rows,) filled by an asynchronous copy
    copied: torch.cuda.Event | None   # recorded after the copy; None on a CPU
    logits: torch.Tensor              # kept for logprobs, computed only when some row asks
    params: list[SamplingParams]

    @classmethod
    def start(cls, token_ids: torch.Tensor, logits: torch.Tensor,
              params: list[SamplingParams]) -> PendingTokens:
        if token_ids.device.type != "cuda":
            return cls(token_ids, token_ids, None, logits, params)
        host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host.copy_(token_ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(token_ids, host, copied, logits, params)

    def wait(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_token_ids.tolist()


class Sampler:
    def __init__(self, device: torch.device, seed: int, eos_token_ids: tuple[int, ...] = ()):
        self.device = device
        self.eos_token_ids = eos_token_ids   # what min_tokens keeps from being sampled
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def request_generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.is_greedy:
            return None
        return torch.Generator(device=self.device).manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None],
                 histories: list[TokenHistory] | None = None,
                 token_mask: TokenMask | None = None) -> SamplerOutput:
        """Sample and wait for the tokens: `launch` then `read`."""
        return self.read(self.launch(logits, params, generators, histories, token_mask))

    @torch.no_grad()
    def launch(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None],
               histories: list[TokenHistory] | None = None,
               token_mask: TokenMask | None = None) -> PendingTokens:
        """Queue the sampling of a batch on the logits' device and the copy of its tokens to the
        host, without waiting for either. logits: (num_rows, vocab) fp32, one row per sequence
        that samples this step; `histories`, each row's tokens, are needed only when some row
        `changes_logits`; `token_mask` holds the allowed tokens of the rows that have a grammar."""
        processed = logits
        if histories is not None:
            processed = process_logits(logits, params, histories, self.eos_token_ids)
        if token_mask is not None:
            processed = apply_token_mask(processed, token_mask)
        token_ids = processed.argmax(dim=-1)
        if not all(p.is_greedy for p in params):
            # Every row is sampled (greedy rows at temperature 1, then discarded): one batched
            # pass with no indexing by row, and no host sync before the tokens are read back.
            rows = self._row_params(params, logits.shape[-1], logits.device)
            sampled = self._sample(processed, rows, params, generators)
            token_ids = torch.where(rows[:, 0] > 0, sampled, token_ids)
        return PendingTokens.start(token_ids, logits, params)

    def read(self, pending: PendingTokens) -> SamplerOutput:
        """Wait for a launched batch's tokens; their logprobs when asked for."""
        token_ids = pending.wait()
        return SamplerOutput(token_ids, self._logprobs(pending.logits, pending.token_ids,
                                                       pending.params))

    @staticmethod
    def _row_params(params: list[SamplingParams], vocab: int, device: torch.device
                    ) -> torch.Tensor:
        """(num_rows, 4): temperature (0 for greedy), top-k, top-p, min-p; one pinned copy."""
        rows = torch.tensor([[p.temperature, p.top_k or vocab, p.top_p, p.min_p] for p in params],
                            dtype=torch.float32)
        if device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(device, non_blocking=True)

    def _sample(self, logits: torch.Tensor, rows: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        temperature = torch.where(rows[:, 0] > 0, rows[:, 0], 1.0)
        logits = logits / temperature[:, None]
        logits = self._filter(logits, rows, params)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)

    def _filter(self, logits: torch.Tensor, rows: torch.Tensor,
                params: list[SamplingParams]) -> torch.Tensor:
        """Mask with -inf what top-k, top-p and min-p exclude; every row keeps its best token.

        Which filters run is decided from the host-side parameters, never from device values.
        """
        device = logits.device
        vocab = logits.shape[-1]
        top_k, top_p, min_p = rows[:, 1], rows[:, 2], rows[:, 3]
        if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=device)[None, :]
            drop = ranks >= top_k[:, None]
            sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop |= mass_before > top_p[:, None]
            drop[:, 0] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        if any(p.min_p > 0 for p in params):
            probs = logits.softmax(dim=-1)
            threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        return logits

    def _logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor,
                  params: list[SamplingParams]) -> list[tuple[float, dict[int, float]] | None]:
        wanted = [p.logprobs for p in params]
        if all(n is None for n in wanted):
            return [None] * len(params)
        logprobs = logits.log_softmax(dim=-1)
        chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
        max_n = max(n or 0 for n in wanted)
        top_values, top_ids = logprobs.topk(max_n, dim=-1) if max_n else (None, None)
        top_values = top_values.tolist() if max_n else None
        top_ids = top_ids.tolist() if max_n else None
        out: list[tuple[float, dict[int, float]] | None] = []
        for i, n in enumerate(wanted):
            if n is None:
                out.append(None)
                continue
            top = dict(zip(top_ids[i][:n], top_values[i][:n])) if n else {}
            out.append((chosen[i], top))
        return out
