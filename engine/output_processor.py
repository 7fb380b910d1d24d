"""Turns the engine's token updates into request outputs with text, and applies stop strings.

Each request gets an incremental detokenizer. When a stop string completes, the request is reported
finished with reason "stop" and the caller must tell the engine to finish it (the returned
`stopped` list), so no further token is computed for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.llm_engine import SequenceUpdate
from tandem.contracts.outputs import CompletionOutput, Logprob, RequestOutput
from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.sequence import FinishReason


@dataclass(slots=True)
class _RequestState:
    output: RequestOutput
    detokenizer: IncrementalDetokenizer
    wants_logprobs: bool


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, params.stop, params.include_stop_str_in_output,
            params.skip_special_tokens, params.min_tokens)
        completion = CompletionOutput(0, "", [], logprobs=[] if params.logprobs is not None else None)
        output = RequestOutput(request_id, prompt, list(prompt_token_ids), [completion])
        self.requests[request_id] = _RequestState(output, detokenizer, params.logprobs is not None)

    def process(self, updates: list[SequenceUpdate]) -> tuple[list[RequestOutput], list[str]]:
        """Outputs touched by this step, and the ids of requests a stop string just ended."""
        outputs, stopped = [], []
        for update in updates:
            state = self.requests.get(update.request_id)
            if state is None:
                continue
            completion = state.output.outputs[0]
            completion.token_ids.extend(update.new_token_ids)
            if state.wants_logprobs:
                completion.logprobs.extend(
                    Logprob(t, lp, top) for t, (lp, top) in zip(update.new_token_ids,
                                                                 update.new_logprobs))
            finished = update.finished
            matched = state.detokenizer.add_tokens(update.new_token_ids)
            if matched is not None:
                if not finished:
                    stopped.append(update.request_id)
                finished = True
                completion.finish_reason, completion.stop_reason = FinishReason.STOP.value, matched
            elif finished:
                completion.finish_reason = update.finish_reason.value
                completion.stop_reason = update.stop_reason
            state.output.num_cached_tokens = update.num_cached_tokens
            state.output.text_delta = state.detokenizer.get_text_delta(finished)
            completion.text = state.detokenizer.output_text
            state.output.finished = finished
            outputs.append(state.output)
            if finished:
                del self.requests[update.request_id]
        return outputs, stopped

    def abort(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
