"""The public gRPC API, `tandem.v1.Generation/Generate`, plus the standard health service and
server reflection. Cancelling a call aborts the request everywhere it lives.
"""

from __future__ import annotations

import logging
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc
from tandem.frontend.pipeline import Pipeline
from tandem.frontend.types import GenerateRequest, RequestRejected
from tandem.contracts.wire import logprob_to_proto, sampling_from_proto

logger = logging.getLogger(__name__)

SERVICE_NAME = "tandem.v1.Generation"
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}


class GenerationService(pbgrpc.GenerationServicer):
    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    async def Generate(self, request: pb.GenerateRequest, context):
        try:
            internal = self._to_internal(request)
        except RequestRejected as err:
            await context.abort(_STATUS.get(err.status, grpc.StatusCode.INTERNAL), err.message)
        stream = self.pipeline.generate(internal)
        num_output = 0
        try:
            async for chunk in stream:
                num_output += len(chunk.token_ids)
                response = pb.GenerateResponse(
                    request_id=request.request_id or internal.request_id,
                    token_ids=chunk.token_ids, text=chunk.text,
                    logprobs=[logprob_to_proto(lp.token_id, (lp.logprob, lp.top_logprobs))
                              for lp in chunk.logprobs])
                if chunk.finish_reason is not None:
                    response.finish_reason = chunk.finish_reason
                    if chunk.stop_reason is not None:
                        response.stop_reason = str(chunk.stop_reason)
                    response.usage.CopyFrom(pb.Usage(
                        prompt_tokens=chunk.num_prompt_tokens, completion_tokens=num_output,
                        cached_tokens=chunk.num_cached_tokens))
                yield response
        except RequestRejected as err:
            await context.abort(_STATUS.get(err.status, grpc.StatusCode.UNAVAILABLE), err.message)
        finally:
            await stream.aclose()

    def _to_internal(self, request: pb.GenerateRequest) -> GenerateRequest:
        pipeline = self.pipeline
        if request.model and request.model != pipeline.model_name:
            raise RequestRejected(f"model {request.model!r} is not served here; this server "
                                  f"serves {pipeline.model_name!r}")
        kind = request.WhichOneof("prompt")
        if kind == "text":
            token_ids = pipeline.tokenizer.encode(request.text)
        elif kind == "token_ids":
            token_ids = list(request.token_ids.ids)
        else:
            raise RequestRejected("the request has no prompt: set text or token_ids")
        if not token_ids:
            raise RequestRejected("the prompt is empty: at least one token is needed")
        vocab = pipeline.model.config.vocab_size
        if any(t >= vocab for t in token_ids):
            raise RequestRejected(f"prompt token ids must be below the vocabulary size {vocab}")
        room = pipeline.max_model_len - len(token_ids)
        if room < 1:
            raise RequestRejected(f"the prompt has {len(token_ids)} tokens but the model's "
                                  f"context is {pipeline.max_model_len} tokens")
        sampling = request.sampling
        if sampling.HasField("max_tokens") and sampling.max_tokens > room:
            raise RequestRejected(f"max_tokens {sampling.max_tokens} plus the prompt's "
                                  f"{len(token_ids)} tokens exceed the model's context of "
                                  f"{pipeline.max_model_len} tokens")
        try:
            params = sampling_from_proto(sampling, pipeline.model.default_sampling_params())
        except ValueError as err:
            raise RequestRejected(str(err)) from err
        if params.max_tokens is None:
            params.max_tokens = room
        # Internally every request gets a fresh id: two clients may well pick the same one.
        request_id = f"grpc-{uuid.uuid4().hex}"
        if request.request_id:
            logger.info("request %s is the client's %r", request_id, request.request_id)
        return GenerateRequest(request_id, token_ids, params,
                               request.text if kind == "text" else None)


def add_public_services(server: grpc.aio.Server, pipeline: Pipeline) -> health.HealthServicer:
    pbgrpc.add_GenerationServicer_to_server(GenerationService(pipeline), server)
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
