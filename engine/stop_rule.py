"""The one rule for when a freshly sampled token ends a request.

The scheduler applies it to every token it samples; the frontend applies it to the first token a
prefill worker sampled, before it hands the request to a decode worker (a request may end there).
Stop strings are not here: they need text, and text is made by the detokenizer. Below
`min_tokens` output tokens eos and stop tokens do not end a request (the sampler masks them too;
this keeps a token that arrives anyway, from a prefill worker's earlier step, from ending it).
"""

from __future__ import annotations

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.sequence import FinishReason


def finish_after_token(params: SamplingParams, token_id: int, num_output_tokens: int,
                       num_tokens: int, eos_token_ids: set[int] | frozenset[int],
                       max_model_len: int) -> FinishReason | None:
    """The finish reason `token_id` implies, given the counts that include it; None to go on."""
    if num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token_id in eos_token_ids:
            return FinishReason.STOP
        if token_id in params.stop_token_ids:
            return FinishReason.STOP
    if ends_by_length(params, num_output_tokens, num_tokens, max_model_len):
        return FinishReason.LENGTH
    return None


def ends_by_length(params: SamplingParams, num_output_tokens: int, num_tokens: int,
                   max_model_len: int) -> bool:
    """Whether a request with these counts has reached max_tokens or the context limit: it ends
    whatever its last token was."""
    return ((params.max_tokens is not None and num_output_tokens >= params.max_tokens)
            or num_tokens >= max_model_len)


def stop_reason_of(reason: FinishReason | None, params: SamplingParams,
                   token_id: int) -> int | None:
    """The stop token to report: the token itself when it was one of the request's stop tokens."""
    if reason == FinishReason.STOP and token_id in params.stop_token_ids:
        return token_id
    return None
