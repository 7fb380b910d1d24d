"""KServe v2 responses for one request, built from the pipeline's chunks.

A `ResponseWriter` gathers chunks; `step()` turns what arrived since the last response into a
streamed response (new text, "None" as finish reason, the new tokens' count), `last()` writes the
final one(s), and `whole()` the single answer of a request that does not stream. Which outputs a
response holds: `text_output` always, the others when the request names them among its outputs or
sets their `return_*` flag (kserve_inputs).
"""

from __future__ import annotations

from tandem.api.kserve.v2 import inference_pb2 as kpb
from tandem.frontend.kserve_inputs import KServeInputs
from tandem.frontend.kserve_tensors import add_output
from tandem.frontend.types import GenerateChunk, GenerateRequest

FINAL_PARAMETER = "triton_final_response"
ENABLE_FINAL_PARAMETER = "triton_enable_empty_final_response"


class ResponseWriter:
    def __init__(self, request: kpb.ModelInferRequest, inputs: KServeInputs,
                 internal: GenerateRequest, streaming: bool):
        self.request_id = request.id
        self.model_name = request.model_name or ""
        self.inputs = inputs
        self.streaming = streaming
        self.shape = (1, 1) if inputs.batched else (1,)
        enable = request.parameters.get(ENABLE_FINAL_PARAMETER)
        self.empty_final = streaming and enable is not None and enable.bool_param
        self.num_prompt_tokens = len(internal.prompt_token_ids)
        self.text = ""                 # all generated text
        self.num_output_tokens = 0
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.pending_text = ""         # since the last streamed response
        self.pending_tokens = 0

    def add(self, chunk: GenerateChunk) -> bool:
        """Take a chunk; True when a streamed response (not the last) is due."""
        self.text += chunk.text
        self.pending_text += chunk.text
        self.num_output_tokens += len(chunk.token_ids)
        self.pending_tokens += len(chunk.token_ids)
        self.cumulative_logprob += sum(lp.logprob for lp in chunk.logprobs)
        self.num_prompt_tokens = chunk.num_prompt_tokens or self.num_prompt_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        return bool(chunk.text) and chunk.finish_reason is None

    def step(self) -> kpb.ModelInferResponse:
        response = self._response(self.pending_text, self.pending_tokens)
        self.pending_text, self.pending_tokens = "", 0
        return response

    def last(self, streamed: bool) -> list[kpb.ModelInferResponse]:
        responses = [self.step() if streamed else self.whole()]
        if self.empty_final:
            final = kpb.ModelInferResponse(id=self.request_id, model_name=self.model_name)
            final.parameters[FINAL_PARAMETER].bool_param = True
            responses.append(final)
        return responses

    def whole(self) -> kpb.ModelInferResponse:
        prefix = "" if self.inputs.exclude_input else self.inputs.text
        return self._response(prefix + self.text, self.num_output_tokens)

    def _response(self, text: str, num_output_tokens: int) -> kpb.ModelInferResponse:
        response = kpb.ModelInferResponse(id=self.request_id, model_name=self.model_name,
                                          model_version="1")
        if self.empty_final:
            response.parameters[FINAL_PARAMETER].bool_param = False
        add_output(response, "text_output", "BYTES", [text.encode()], self.shape)
        returns = self.inputs.returns
        if "finish_reason" in returns:
            add_output(response, "finish_reason", "BYTES", [str(self.finish_reason).encode()],
                       self.shape)
        if "num_input_tokens" in returns:
            add_output(response, "num_input_tokens", "UINT32", [self.num_prompt_tokens],
                       self.shape)
        if "num_output_tokens" in returns:
            add_output(response, "num_output_tokens", "UINT32", [num_output_tokens], self.shape)
        if "cumulative_logprob" in returns:
            add_output(response, "cumulative_logprob", "FP32", [self.cumulative_logprob],
                       self.shape)
        return response
