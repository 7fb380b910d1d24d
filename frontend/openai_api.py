"""The OpenAI-compatible HTTP API of tandem's frontend, on FastAPI.

`create_app(pipeline, tokenizer)` serves:

- `POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed as server-sent events
  (`data: {json}` per chunk, then `data: [DONE]`; with `stream_options.include_usage` a last chunk
  with no choices carries the usage);
- `GET /v1/models` (the one served model, with its `max_model_len`), `GET /health` (200, or 503
  while the pipeline is not ready or draining), `GET /metrics` (Prometheus text format of the given
  registry);
- vLLM's extras: `POST /tokenize`, `POST /detokenize` (openai_tokenize), `GET /version` and
  `GET|POST /ping` (as /health).

A request with several choices (`n`, `best_of`, a list of prompts) runs one pipeline request per
generation and puts them together (openai_choices). Sampling fields the client leaves out take the
model's defaults (generation_config.json), as on gRPC. Chat requests may give `tools`: the chat
template shows them to the model and the reply's calls come back as `tool_calls` (openai_tools).

This module is the I/O shell. Validation and tokenization live in `openai_inputs` (with the rules
shared with gRPC in `request_rules`), response shapes in `openai_outputs`, disconnect handling in
`openai_sse`, admission in `admission`, and everything past the `GenerateRequest` (routing, workers,
detokenization) in the pipeline. Each request runs as: refuse with 503 if the pipeline cannot take
work or is full (with `Retry-After`); read the body, refusing with 413 past `max_request_bytes`
(4 MiB by default: a 128k-token prompt as JSON text or token ids takes about 1 MiB) before it is
all read; validate it and tokenize the prompt on the tokenizer thread; call `pipeline.generate`;
collect or stream its chunks. A client that disconnects ends the iteration and closes the
pipeline's generator, which aborts the request.

Errors are OpenAI error objects (`openai_errors`). A request the client must change is a 400,
except an unknown model: a 404 as vLLM answers it. A `RequestRejected` from the pipeline, even one raised while iterating, keeps
its status when no byte has been sent yet; once a stream has started, it arrives as a final
`data: {"error": ...}` event before `[DONE]`, which OpenAI's clients raise as an APIError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.requests import ClientDisconnect
from transformers import PreTrainedTokenizerBase

from tandem.contracts.sampling_params import SamplingParams
from tandem.frontend.admission import AdmissionGate
from tandem.frontend.openai_choices import ChoicePlan, ChoiceSet, merge_streams, plan_choices
from tandem.frontend.openai_errors import OpenAIError, error_response, install_error_handlers, internal_error
from tandem.frontend.openai_inputs import chat_request, check_supported, completion_requests, parse_body
from tandem.frontend.openai_outputs import ChatFormatter, CompletionFormatter, make_token_text
from tandem.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from tandem.frontend.openai_tokenize import TokenizeRoutes
from tandem.frontend.openai_tools import tool_calling
from tandem.frontend.tool_parsers import ToolCallParser, detect_parser, make_parser
from tandem.frontend.request_rules import RequestError, RequestLimits, RequestRules, check_model
from tandem.frontend.openai_sse import (SSE_DONE, ClientDisconnected, SSEResponse, close_iterator,
                                      run_unless_disconnected, sse_event)
from tandem.frontend.types import GenerateChunk, GenerateRequest, RequestPipeline, RequestRejected

logger = logging.getLogger(__name__)

Formatter = CompletionFormatter | ChatFormatter


def create_app(pipeline: RequestPipeline, tokenizer: PreTrainedTokenizerBase,
               metrics_registry: CollectorRegistry | None = None, *,
               limits: RequestLimits = RequestLimits(), rules: RequestRules | None = None,
               tokenize_executor: ThreadPoolExecutor | None = None,
               defaults: SamplingParams | None = None,
               tool_call_parser: str | None = None) -> FastAPI:
    """The HTTP app serving `pipeline` (an `AdmissionGate` to bound the load); `tokenizer` must be
    the one the pipeline's model uses. `rules` default to the pipeline's model, the tokenizer's
    vocabulary and `limits`; `tokenize_executor`, one thread, is shared with the gRPC API when
    given; `defaults` (the model's generation config) fill the sampling fields a request leaves
    out; `tool_call_parser` reads tool calls out of replies (tool_parsers; None: the one the chat
    template calls for, if any)."""
    rules = rules or default_rules(pipeline, tokenizer, limits)
    owns_executor = tokenize_executor is None
    executor = tokenize_executor or tokenizer_thread()
    server = _OpenAIServer(pipeline, tokenizer, metrics_registry or REGISTRY, rules,
                           limits.max_request_bytes, executor, defaults,
                           chosen_tool_parser(tool_call_parser, tokenizer))
    tokenize = TokenizeRoutes(tokenizer, rules, executor, server.read_body)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_executor:
            executor.shutdown(wait=False, cancel_futures=True)

    # No generated docs: the routes parse their bodies themselves, so the schema would be empty.
    app = FastAPI(title="tandem", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])
    app.add_api_route("/ping", server.health, methods=["GET", "POST"])
    app.add_api_route("/version", tokenize.version, methods=["GET"])
    app.add_api_route("/tokenize", tokenize.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", tokenize.detokenize, methods=["POST"])
    return app


def tokenizer_thread() -> ThreadPoolExecutor:
    """The one thread that tokenizes: Hugging Face tokenizers are not safe to share between threads,
    and long prompts must not stall the event loop that streams every other request."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-tokenize")


def default_rules(pipeline: RequestPipeline, tokenizer: PreTrainedTokenizerBase,
                  limits: RequestLimits = RequestLimits(), vocab_size: int | None = None
                  ) -> RequestRules:
    """Rules for the pipeline's model; token ids must be known to the tokenizer and, when given,
    below the model's `vocab_size` (its embedding rows)."""
    return RequestRules.for_vocab(pipeline.model_name, pipeline.max_model_len, tokenizer.get_vocab(),
                                  min(len(tokenizer), vocab_size or len(tokenizer)), limits)


def chosen_tool_parser(name: str | None, tokenizer: PreTrainedTokenizerBase
                       ) -> ToolCallParser | None:
    """The parser named, or the one the tokenizer's chat template calls for (None: no tools)."""
    name = name or detect_parser(tokenizer.chat_template)
    if name is None:
        return None
    logger.info("tool calls are read with the %s parser", name)
    return make_parser(name)


@dataclass(frozen=True, slots=True)
class _Prepared:
    response_id: str
    plan: ChoicePlan
    choices: ChoiceSet
    stream: bool
    include_usage: bool

    @property
    def generations(self) -> list[GenerateRequest]:
        return self.plan.generations


class _OpenAIServer:
    def __init__(self, pipeline: RequestPipeline, tokenizer: PreTrainedTokenizerBase,
                 registry: CollectorRegistry, rules: RequestRules, max_request_bytes: int,
                 tokenize_executor: ThreadPoolExecutor, defaults: SamplingParams | None = None,
                 tool_parser: ToolCallParser | None = None):
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.registry = registry
        self.rules = rules
        self.max_request_bytes = max_request_bytes
        self.token_text = make_token_text(tokenizer)
        self.started_s = int(time.time())
        self.tokenize_executor = tokenize_executor
        self.defaults = defaults
        self.tool_parser = tool_parser

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, f"cmpl-{uuid.uuid4().hex}", self._prepare_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, f"chatcmpl-{uuid.uuid4().hex}", self._prepare_chat)

    async def models(self, request: Request) -> Response:
        cards = [ModelCard(id=name, created=self.started_s, root=self.pipeline.model_name,
                           max_model_len=self.rules.max_model_len)
                 for name in self.rules.model_names]  # every --served-model-name
        return JSONResponse(ModelList(data=cards).model_dump())

    async def health(self, request: Request) -> Response:
        try:
            self._check_serving()
        except OpenAIError as error:
            return error_response(error)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def _check_serving(self) -> None:
        if self.pipeline.is_draining:
            raise OpenAIError("the server is draining: it finishes the requests it has but takes no new "
                              "ones; send this request to another replica", 503, code="server_draining")
        if not self.pipeline.is_ready:
            raise OpenAIError(f"the server is not ready: {self.pipeline.not_ready_reason}; retry "
                              "shortly", 503, code="server_not_ready")

    def _check_room(self) -> None:
        """Refuse before reading the body when the server is full: the cheapest moment."""
        if isinstance(self.pipeline, AdmissionGate) and self.pipeline.is_full:
            raise self.pipeline.overloaded()

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to pass `max_request_bytes`."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _serve(self, request: Request, request_id: str,
                     prepare: Callable[[bytes, str], _Prepared]) -> Response:
        try:
            self._check_serving()
            self._check_room()
            body = await self.read_body(request)
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self.tokenize_executor, prepare, body, request_id)
            first = prepared.generations[0]
            logger.debug("request %s: %d generations, %d prompt tokens, max_tokens %s, stream %s",
                         request_id, len(prepared.generations), len(first.prompt_token_ids),
                         first.params.max_tokens, prepared.stream)
            if prepared.stream:
                return await self._stream(request, prepared)
            return await self._complete(request, prepared)
        except RequestError as error:
            logger.debug("request %s refused (%d): %s", request_id, error.status, error.message)
            return error_response(OpenAIError.from_request_error(error))
        except OpenAIError as error:
            logger.debug("request %s refused (%d): %s", request_id, error.status, error.message)
            return error_response(error)
        except RequestRejected as exc:
            logger.info("request %s rejected by the pipeline (%d): %s", request_id, exc.status, exc.message)
            return error_response(OpenAIError.from_rejected(exc))
        except (ClientDisconnected, ClientDisconnect):
            logger.info("request %s: client disconnected; request abandoned", request_id)
            return Response(status_code=499)   # nobody reads it; the status is for access logs
        except Exception:
            logger.exception("request %s failed", request_id)
            return error_response(internal_error(request_id))

    def _prepare_completion(self, body: bytes, request_id: str) -> _Prepared:
        parsed = self._parse(body, CompletionRequest)
        prompts = completion_requests(parsed, request_id, self.tokenizer, self.rules, self.defaults)
        plan = plan_choices(prompts, request_id, parsed.n or 1, parsed.best_of)
        echoes = [self._echo_text(plan.generations[g]) if parsed.echo else ""
                  for g in range(len(plan.generations))]
        formatters = [self._formatter(CompletionFormatter, request_id, g, prompts[plan.prompt_of(g)],
                                      echo_text=echoes[g])
                      for g in range(len(plan.generations))]
        return _Prepared(request_id, plan, ChoiceSet(plan, formatters), bool(parsed.stream),
                         parsed.include_usage)

    def _prepare_chat(self, body: bytes, request_id: str) -> _Prepared:
        parsed = self._parse(body, ChatCompletionRequest)
        tools = tool_calling(parsed, self.tool_parser)
        prompt = chat_request(parsed, request_id, self.tokenizer, self.rules, self.defaults)
        plan = plan_choices([prompt], request_id, parsed.n or 1)
        formatters = [self._formatter(ChatFormatter, request_id, g, prompt, tools=tools)
                      for g in range(len(plan.generations))]
        return _Prepared(request_id, plan, ChoiceSet(plan, formatters), bool(parsed.stream),
                         parsed.include_usage)

    def _parse(self, body: bytes, schema: type) -> Any:
        """Parse and check a body; tokenizing it is the caller's."""
        parsed = parse_body(body, schema)
        check_model(parsed.model, self.rules)
        check_supported(parsed)
        return parsed

    def _formatter(self, kind: type[Formatter], response_id: str, index: int,
                   prompt: GenerateRequest, **kwargs: Any) -> Formatter:
        # The client's logprobs, from its prompt's parameters: best_of asks for more internally.
        return kind(response_id, self.pipeline.model_name, len(prompt.prompt_token_ids),
                    prompt.params.logprobs, self.token_text, index, **kwargs)

    def _echo_text(self, request: GenerateRequest) -> str:
        if request.prompt_text is not None:
            return request.prompt_text
        return self.tokenizer.decode(request.prompt_token_ids,
                                     skip_special_tokens=request.params.skip_special_tokens)

    async def _complete(self, request: Request, prepared: _Prepared) -> Response:
        chunks = merge_streams([self.pipeline.generate(g) for g in prepared.generations])
        try:
            await run_unless_disconnected(request.receive, _collect(chunks, prepared.choices))
        finally:
            await close_iterator(chunks)
        return JSONResponse(prepared.choices.response())

    async def _stream(self, request: Request, prepared: _Prepared) -> Response:
        chunks = merge_streams([self.pipeline.generate(g) for g in prepared.generations])
        try:
            # Wait for the first chunk before answering: a rejection found by then keeps its status.
            first = await run_unless_disconnected(request.receive, _next_chunk(chunks))
        except BaseException:
            await close_iterator(chunks)
            raise
        return SSEResponse(_events(chunks, first, prepared))


def _too_large(num_bytes: int, limit: int) -> OpenAIError:
    return OpenAIError(f"the request body is {num_bytes} bytes or more, past this server's limit of "
                       f"{limit} bytes", 413, code="request_too_large")


async def _collect(chunks: AsyncIterator[tuple[int, GenerateChunk]], choices: ChoiceSet) -> None:
    async for generation, chunk in chunks:
        choices.add(generation, chunk)


async def _next_chunk(chunks: AsyncIterator[tuple[int, GenerateChunk]]
                      ) -> tuple[int, GenerateChunk] | None:
    return await anext(chunks, None)


async def _events(chunks: AsyncIterator[tuple[int, GenerateChunk]],
                  first: tuple[int, GenerateChunk] | None, prepared: _Prepared
                  ) -> AsyncIterator[bytes]:
    """The SSE body of a streamed request; closing it early closes the pipeline's generators."""
    choices = prepared.choices
    request_id = prepared.response_id
    try:
        for payload in choices.prologue():
            yield sse_event(payload)
        item = first
        while item is not None:
            event = choices.stream_event(*item)
            if event is not None:
                yield event
            item = await anext(chunks, None)
        if prepared.include_usage:
            yield sse_event(choices.usage_chunk())
    except RequestRejected as exc:
        logger.info("request %s rejected mid-stream (%d): %s", request_id, exc.status, exc.message)
        yield sse_event(OpenAIError.from_rejected(exc).body())
    except Exception:
        logger.exception("request %s failed mid-stream", request_id)
        yield sse_event(internal_error(request_id).body())
    finally:
        await close_iterator(chunks)
    yield SSE_DONE
