"""The public gRPC API, `tandem.v1.Generation/Generate`, plus the standard health service and
server reflection. Cancelling a call aborts the request everywhere it lives.

Requests follow the same rules as the OpenAI API (`request_rules`): a client mistake is
INVALID_ARGUMENT with the same message the HTTP API would give. The prompt is tokenized on the
frontend's one tokenizer thread, never on the event loop. Bytes that do not parse as a
`GenerateRequest` are INVALID_ARGUMENT too: the method is registered with a deserializer that hands
the failure to the handler instead of letting grpc answer it (grpc would say UNKNOWN or INTERNAL).
A request past the server's maximum message size never reaches the handler: grpc itself answers
RESOURCE_EXHAUSTED ("Received message larger than max (N vs. LIMIT)"), naming the limit.
An overloaded server answers UNAVAILABLE with a `retry-after` trailer (seconds).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import PreTrainedTokenizerBase

from tandem.api.v1 import generation_pb2 as pb
from tandem.contracts.sampling_params import SamplingParams
from tandem.contracts.wire import logprob_to_proto
from tandem.frontend.admission import AdmissionGate
from tandem.frontend.request_rules import (RequestError, RequestRules, check_model,
                                         check_prompt_chars, check_prompt_ids, check_prompt_length,
                                         checked_logit_bias, resolve_max_tokens, sampling_params)
from tandem.frontend.response_format import checked_json_schema
from tandem.frontend.types import GenerateRequest, RequestPipeline, RequestRejected

logger = logging.getLogger(__name__)

SERVICE_NAME = "tandem.v1.Generation"
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
           413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
           502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE}


class _Undecodable:
    """What the deserializer hands on for bytes that are no `GenerateRequest`."""

    def __init__(self, reason: str):
        self.reason = reason


def _parse_request(data: bytes) -> pb.GenerateRequest | _Undecodable:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as exc:
        return _Undecodable(str(exc) or "unparseable message")


class GenerationService:
    def __init__(self, pipeline: RequestPipeline, tokenizer: PreTrainedTokenizerBase,
                 rules: RequestRules, tokenize_executor: ThreadPoolExecutor,
                 defaults: SamplingParams | None = None):
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.rules = rules
        self.tokenize_executor = tokenize_executor
        self.defaults = defaults   # the model's generation config, for fields a request leaves unset

    async def Generate(self, request: pb.GenerateRequest | _Undecodable, context):
        try:
            internal = await self._prepare(request)
        except RequestError as err:
            await context.abort(_STATUS.get(err.status, grpc.StatusCode.INVALID_ARGUMENT), err.message)
        except RequestRejected as err:
            await _abort_rejected(context, err)
        stream = self.pipeline.generate(internal)
        num_output = 0
        try:
            async for chunk in stream:
                num_output += len(chunk.token_ids)
                yield _response(request.request_id or internal.request_id, chunk, num_output)
        except RequestRejected as err:
            await _abort_rejected(context, err)
        finally:
            await stream.aclose()

    async def _prepare(self, request: pb.GenerateRequest | _Undecodable) -> GenerateRequest:
        if isinstance(request, _Undecodable):
            raise RequestError(f"the request is not a valid tandem.v1.GenerateRequest: {request.reason}")
        if self.pipeline.is_draining:
            raise RequestRejected("the server is shutting down", 503, "service_unavailable")
        if isinstance(self.pipeline, AdmissionGate) and self.pipeline.is_full:
            raise self.pipeline.overloaded()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenize_executor, self._to_internal, request)

    def _to_internal(self, request: pb.GenerateRequest) -> GenerateRequest:
        """Checks and tokenization, on the tokenizer thread."""
        rules = self.rules
        check_model(request.model, rules)
        token_ids = self._prompt_ids(request)
        sampling = request.sampling
        requested = sampling.max_tokens if sampling.HasField("max_tokens") else None
        max_tokens = resolve_max_tokens(requested, len(token_ids), rules)
        logprobs = sampling.logprobs if sampling.HasField("logprobs") else None
        params = sampling_params(_given_fields(sampling, rules), max_tokens, logprobs, rules,
                                 self.defaults)
        # Internally every request gets a fresh id: two clients may well pick the same one.
        request_id = f"grpc-{uuid.uuid4().hex}"
        if request.request_id:
            logger.info("request %s is the client's %r", request_id, request.request_id)
        return GenerateRequest(request_id, token_ids, params,
                               request.text if request.WhichOneof("prompt") == "text" else None)

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            token_ids = list(request.token_ids.ids)
            check_prompt_ids(token_ids, self.rules, "token_ids")
            return token_ids
        if kind != "text":
            raise RequestError("the request has no prompt: set text or token_ids", "prompt")
        check_prompt_chars(len(request.text), self.rules, "text")
        token_ids = [int(t) for t in self.tokenizer.encode(request.text)]
        if not token_ids:
            raise RequestError("the prompt is empty: at least one token is needed", "text")
        check_prompt_length(len(token_ids), self.rules, "text")
        return token_ids


def _given_fields(sampling: pb.SamplingOptions, rules: RequestRules) -> dict[str, Any]:
    """The sampling fields the client set, by `SamplingParams` name."""
    given: dict[str, Any] = {name: getattr(sampling, name)
                             for name in ("temperature", "top_p", "top_k", "min_p", "seed",
                                          "presence_penalty", "frequency_penalty",
                                          "repetition_penalty", "skip_special_tokens")
                             if sampling.HasField(name)}
    given.update(stop=list(sampling.stop), stop_token_ids=list(sampling.stop_token_ids),
                 ignore_eos=sampling.ignore_eos,
                 logit_bias=checked_logit_bias(sampling.logit_bias, rules),
                 min_tokens=sampling.min_tokens,
                 include_stop_str_in_output=sampling.include_stop_str_in_output)
    if sampling.HasField("json_schema"):
        given["json_schema"] = checked_json_schema(sampling.json_schema)
        given["num_schema_prompt_tokens"] = sampling.num_schema_prompt_tokens
    return given


def _response(request_id: str, chunk, num_output: int) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=request_id, token_ids=chunk.token_ids, text=chunk.text,
        logprobs=[logprob_to_proto(lp.token_id, (lp.logprob, lp.top_logprobs))
                  for lp in chunk.logprobs])
    if chunk.finish_reason is not None:
        response.finish_reason = chunk.finish_reason
        if chunk.stop_reason is not None:
            response.stop_reason = str(chunk.stop_reason)
        response.usage.CopyFrom(pb.Usage(
            prompt_tokens=chunk.num_prompt_tokens, completion_tokens=num_output,
            cached_tokens=chunk.num_cached_tokens))
    return response


async def _abort_rejected(context, err: RequestRejected) -> None:
    retry_after_s = getattr(err, "retry_after_s", None)   # set when the server is overloaded
    trailer = (("retry-after", str(retry_after_s)),) if retry_after_s is not None else ()
    await context.abort(_STATUS.get(err.status, grpc.StatusCode.INTERNAL), err.message,
                        trailing_metadata=trailer)


def add_public_services(server: grpc.aio.Server, service: GenerationService) -> health.HealthServicer:
    method = grpc.unary_stream_rpc_method_handler(
        service.Generate, request_deserializer=_parse_request,
        response_serializer=pb.GenerateResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE_NAME, {"Generate": method}),))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    set_health(health_servicer, serving=False)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return health_servicer


def set_health(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, status)
