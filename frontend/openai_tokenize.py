"""vLLM's extra endpoints beside the OpenAI API: `/tokenize`, `/detokenize` and `/version`.

Clients of vLLM count tokens and check prompts with these before they send a request, so they take
vLLM's shapes:

- `POST /tokenize` `{"prompt": "..."}` or `{"messages": [...]}` (rendered with the chat template, as
  /v1/chat/completions would) -> `{"count", "max_model_len", "tokens"}`. The same rules as a
  completion apply (prompt size, context length), so a prompt that tokenizes also fits.
- `POST /detokenize` `{"tokens": [...]}` -> `{"prompt": "..."}`; ids must be in the vocabulary.
- `GET /version` -> `{"version": "<tandem's version>"}`.

Tokenizing runs on the one tokenizer thread the generation routes use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, field_validator
from transformers import PreTrainedTokenizerBase

from tandem.frontend.openai_errors import OpenAIError, error_response
from tandem.frontend.openai_inputs import chat_prompt_ids, completion_prompt_ids, parse_body
from tandem.frontend.openai_protocol import ChatCompletionRequest, ChatMessage
from tandem.frontend.request_rules import RequestError, RequestRules, check_model


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None     # vLLM's field; accepted, the rules decide

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[int] | None) -> str | list[int] | None:
        if value is not None and not value:
            raise ValueError("prompt is empty")
        return value


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    model: str | None = None
    tokens: list[int]


class TokenizeRoutes:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, rules: RequestRules,
                 executor: ThreadPoolExecutor, read_body: Callable[[Request], Awaitable[bytes]]):
        self.tokenizer = tokenizer
        self.rules = rules
        self.executor = executor
        self.read_body = read_body

    async def tokenize(self, request: Request) -> Response:
        return await self._answer(request, self._tokenize)

    async def detokenize(self, request: Request) -> Response:
        return await self._answer(request, self._detokenize)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": tandem_version()})

    async def _answer(self, request: Request, handle: Callable[[bytes], dict]) -> Response:
        try:
            body = await self.read_body(request)
            loop = asyncio.get_running_loop()
            return JSONResponse(await loop.run_in_executor(self.executor, handle, body))
        except RequestError as error:
            return error_response(OpenAIError.from_request_error(error))
        except OpenAIError as error:
            return error_response(error)

    def _tokenize(self, body: bytes) -> dict:
        parsed = parse_body(body, TokenizeRequest)
        check_model(parsed.model, self.rules)
        if (parsed.prompt is None) == (parsed.messages is None):
            raise RequestError("send either prompt or messages", "prompt")
        if parsed.prompt is not None:
            tokens = completion_prompt_ids(parsed.prompt, self.tokenizer, self.rules)
        else:
            chat = ChatCompletionRequest.model_construct(messages=parsed.messages)
            tokens = chat_prompt_ids(chat, self.tokenizer, self.rules)
        return {"count": len(tokens), "max_model_len": self.rules.max_model_len, "tokens": tokens}

    def _detokenize(self, body: bytes) -> dict:
        parsed = parse_body(body, DetokenizeRequest)
        check_model(parsed.model, self.rules)
        for token_id in parsed.tokens:
            if not 0 <= token_id < self.rules.vocab_size:
                raise RequestError(f"token id {token_id} is outside the vocabulary: ids must be "
                                   f"in [0, {self.rules.vocab_size})", "tokens")
        return {"prompt": self.tokenizer.decode(parsed.tokens)}


def tandem_version() -> str:
    try:
        return metadata.version("tandem")
    except metadata.PackageNotFoundError:
        return "unknown"
