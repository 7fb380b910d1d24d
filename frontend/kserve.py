"""KServe v2 / Triton gRPC: `inference.GRPCInferenceService` on the public gRPC port, beside
tandem.v1, so that Triton clients (tritonclient, genai-perf, Triton's vLLM and TensorRT-LLM
backend conventions) work unchanged.

The served model is one decoupled model (ModelConfig says so): ModelStreamInfer streams a response
per step of text when the request sets `stream`, ModelInfer answers once with the whole text.
Inputs are read as `kserve_inputs` describes; the prompt then follows the same path and the same
rules (`request_rules`) as the other APIs: tokenized on the frontend's tokenizer thread, through
the admission gate into the pipeline. A rule's error is INVALID_ARGUMENT with the same message; on
a stream it comes back as that request's `error_message`, and the stream goes on.

Text output follows both backends: a streamed response carries the new text only; a whole answer
carries the prompt followed by the generated text unless `exclude_input_in_output` is set.
`finish_reason` reads "None" until the last response, as the vLLM backend writes it. With the
request parameter `triton_enable_empty_final_response`, a stream ends each request with an empty
response whose parameter `triton_final_response` is true, as Triton does.

The messages come from proto/tandem/api/kserve/v2/inference.proto (the protocol's field numbers in
a package of tandem's own): tritonclient's shipped stubs are built for protobuf 6 and the client
package pins protobuf below 7, so the server does not depend on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from tandem.api.kserve.v2 import inference_pb2 as kpb
from tandem.contracts.sampling_params import SamplingParams
from tandem.frontend.admission import AdmissionGate
from tandem.frontend.kserve_inputs import (DEFAULT_MAX_TOKENS, INPUTS, OUTPUTS, KServeInputs,
                                           parse_inputs)
from tandem.frontend.kserve_outputs import ResponseWriter
from tandem.frontend.kserve_tensors import read_inputs
from tandem.frontend.request_rules import (RequestError, RequestRules, check_model,
                                           check_prompt_chars, check_prompt_length,
                                           checked_logit_bias, resolve_max_tokens,
                                           sampling_params)
from tandem.frontend.response_format import requested_json_schema
from tandem.frontend.types import GenerateRequest, RequestPipeline, RequestRejected

logger = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
           413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
           502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE}
_MODEL_DATATYPES = {"BYTES": kpb.TYPE_STRING, "BOOL": kpb.TYPE_BOOL, "INT32": kpb.TYPE_INT32,
                    "UINT32": kpb.TYPE_UINT32, "UINT64": kpb.TYPE_UINT64, "FP32": kpb.TYPE_FP32}


class KServeService:
    def __init__(self, pipeline: RequestPipeline, tokenizer, rules: RequestRules,
                 tokenize_executor: ThreadPoolExecutor, defaults: SamplingParams | None = None):
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.rules = rules
        self.tokenize_executor = tokenize_executor
        self.defaults = defaults   # the model's generation config

    # ---- health and metadata ----

    async def ServerLive(self, request, context) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self._is_ready)

    async def ModelReady(self, request, context) -> kpb.ModelReadyResponse:
        return kpb.ModelReadyResponse(ready=self._is_ready and self._is_served(request.name))

    async def ServerMetadata(self, request, context) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="tandem", version=_version())

    async def ModelMetadata(self, request, context) -> kpb.ModelMetadataResponse:
        await self._check_served(request.name, context)
        tensor = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=self.rules.model_name, versions=["1"], platform="tandem",
            inputs=[tensor(name=n, datatype=t, shape=s) for n, (t, s) in INPUTS.items()],
            outputs=[tensor(name=n, datatype=t, shape=s) for n, (t, s) in OUTPUTS.items()])

    async def ModelConfig(self, request, context) -> kpb.ModelConfigResponse:
        await self._check_served(request.name, context)
        config = kpb.ModelConfig(
            name=self.rules.model_name, backend="tandem", max_batch_size=0,
            model_transaction_policy=kpb.ModelTransactionPolicy(decoupled=True),
            input=[kpb.ModelInput(name=n, data_type=_MODEL_DATATYPES[t], dims=s,
                                  optional=n != "text_input") for n, (t, s) in INPUTS.items()],
            output=[kpb.ModelOutput(name=n, data_type=_MODEL_DATATYPES[t], dims=s)
                    for n, (t, s) in OUTPUTS.items()])
        return kpb.ModelConfigResponse(config=config)

    @property
    def _is_ready(self) -> bool:
        return self.pipeline.is_ready and not self.pipeline.is_draining

    def _is_served(self, name: str) -> bool:
        return self.rules.serves(name)

    async def _check_served(self, name: str, context) -> None:
        try:
            check_model(name, self.rules)
        except RequestError as err:
            await context.abort(_status(err), err.message)

    # ---- inference ----

    async def ModelInfer(self, request: kpb.ModelInferRequest, context) -> kpb.ModelInferResponse:
        try:
            inputs, internal = await self._prepare(request)
            writer = ResponseWriter(request, inputs, internal, streaming=False)
            async with contextlib.aclosing(self.pipeline.generate(internal)) as chunks:
                async for chunk in chunks:
                    writer.add(chunk)
            return writer.whole()
        except (RequestError, RequestRejected) as err:
            await context.abort(_status(err), err.message)

    async def ModelStreamInfer(self, requests: AsyncIterator[kpb.ModelInferRequest], context
                               ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently; their responses interleave, each with its
        request's id."""
        queue: asyncio.Queue[kpb.ModelStreamInferResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(requests, queue))
        try:
            while (response := await queue.get()) is not None:
                yield response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read_stream(self, requests: AsyncIterator[kpb.ModelInferRequest],
                           queue: asyncio.Queue) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            async for request in requests:
                task = asyncio.create_task(self._stream_one(request, queue))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
            await queue.put(None)
        finally:
            for task in tasks:
                task.cancel()

    async def _stream_one(self, request: kpb.ModelInferRequest, queue: asyncio.Queue) -> None:
        try:
            inputs, internal = await self._prepare(request)
            writer = ResponseWriter(request, inputs, internal, streaming=inputs.stream)
            async with contextlib.aclosing(self.pipeline.generate(internal)) as chunks:
                async for chunk in chunks:
                    if writer.add(chunk) and inputs.stream:
                        await queue.put(kpb.ModelStreamInferResponse(infer_response=writer.step()))
            for response in writer.last(streamed=inputs.stream):
                await queue.put(kpb.ModelStreamInferResponse(infer_response=response))
        except (RequestError, RequestRejected) as err:
            await queue.put(kpb.ModelStreamInferResponse(
                error_message=err.message, infer_response=kpb.ModelInferResponse(
                    id=request.id, model_name=self.rules.model_name)))

    async def _prepare(self, request: kpb.ModelInferRequest
                       ) -> tuple[KServeInputs, GenerateRequest]:
        if self.pipeline.is_draining:
            raise RequestRejected("the server is shutting down", 503, "service_unavailable")
        if isinstance(self.pipeline, AdmissionGate) and self.pipeline.is_full:
            raise self.pipeline.overloaded()
        check_model(request.model_name, self.rules)
        inputs = parse_inputs(read_inputs(request), [o.name for o in request.outputs])
        loop = asyncio.get_running_loop()
        internal = await loop.run_in_executor(self.tokenize_executor, self._to_internal, inputs)
        if request.id:
            logger.info("request %s is the client's %r", internal.request_id, request.id)
        return inputs, internal

    def _to_internal(self, inputs: KServeInputs) -> GenerateRequest:
        """Checks and tokenization, on the tokenizer thread."""
        check_prompt_chars(len(inputs.text), self.rules, "text_input")
        token_ids = [int(t) for t in self.tokenizer.encode(inputs.text)]
        if not token_ids:
            raise RequestError("the prompt is empty: at least one token is needed", "text_input")
        check_prompt_length(len(token_ids), self.rules, "text_input")
        requested = inputs.max_tokens
        if requested is None:
            requested = min(DEFAULT_MAX_TOKENS, self.rules.max_model_len - len(token_ids))
        max_tokens = resolve_max_tokens(requested, len(token_ids), self.rules)
        given = dict(inputs.given)
        logprobs = given.pop("logprobs", None)
        if "logit_bias" in given:
            given["logit_bias"] = checked_logit_bias(given["logit_bias"], self.rules)
        schema = requested_json_schema(None, inputs.guided_json)
        if schema is not None:
            given["json_schema"] = schema
        params = sampling_params(given, max_tokens, logprobs, self.rules, self.defaults)
        return GenerateRequest(f"kserve-{uuid.uuid4().hex}", token_ids, params, inputs.text)


def _status(err: RequestError | RequestRejected) -> grpc.StatusCode:
    return _STATUS.get(err.status, grpc.StatusCode.INTERNAL)


def _version() -> str:
    try:
        return importlib.metadata.version("tandem")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def add_kserve_service(server: grpc.aio.Server, service: KServeService) -> None:
    """Serve `service` as `inference.GRPCInferenceService` on `server`."""
    unary = {"ServerLive": kpb.ServerLiveRequest, "ServerReady": kpb.ServerReadyRequest,
             "ModelReady": kpb.ModelReadyRequest, "ServerMetadata": kpb.ServerMetadataRequest,
             "ModelMetadata": kpb.ModelMetadataRequest, "ModelConfig": kpb.ModelConfigRequest,
             "ModelInfer": kpb.ModelInferRequest}
    handlers = {name: grpc.unary_unary_rpc_method_handler(
        getattr(service, name), request_deserializer=message.FromString,
        response_serializer=lambda response: response.SerializeToString())
        for name, message in unary.items()}
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        service.ModelStreamInfer, request_deserializer=kpb.ModelInferRequest.FromString,
        response_serializer=kpb.ModelStreamInferResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
