"""The OpenAI API's request and response bodies, as pydantic models, and their sampling parameters.

Requests are validated strictly: `"max_tokens": "16"` or `"stream": 1` is a type error (as it is for
OpenAI), not something to coerce. Unknown fields are ignored so that clients which send newer
OpenAI fields keep working; fields tandem knows but cannot honour (`n > 1`, `echo`, penalties,
tools) are refused by `openai_inputs.check_supported` with a message that says so.

Besides the standard fields, both requests take the vLLM extensions that tandem's `SamplingParams`
supports: `top_k`, `min_p`, `ignore_eos`, `stop_token_ids`. Responses follow OpenAI's shapes, plus
vLLM's `stop_reason` (the stop string or token id that ended the output) on each choice.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator



class _StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_StrictModel):
    include_usage: bool | None = None


class _GenerationRequest(_StrictModel):
    """Fields that completions and chat completions share."""
    model: str | None = None                # None: the served model
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Known but unsupported: refused unless left at their defaults.
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError(f"stop must be a string or a list of strings, got {brief_repr(value)}")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int]                  # one prompt: text, or token ids
    max_tokens: int | None = 16              # None: up to the context limit
    logprobs: int | None = None              # top-n, completions style
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, value: Any) -> Any:
        return single_prompt(value)


class ChatMessage(_StrictModel):
    # "developer" is what recent OpenAI clients send in place of "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: str                             # a list of text parts arrives here joined
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        return join_text_parts(value)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None            # None: up to the context limit
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def single_prompt(value: Any) -> str | list[int]:
    """The one prompt of a completions request: text or token ids, alone or in a one-item list."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ValueError("prompt is empty")
        return value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if not value:
            raise ValueError("prompt is empty")
        return value
    if isinstance(value, list) and all(isinstance(p, (str, list)) for p in value):
        raise ValueError(f"batches of prompts are not supported: got {len(value)} prompts, the limit is "
                         "1 per request; send one request per prompt")
    raise ValueError("prompt must be a string or a list of token ids (integers), got "
                     f"{brief_repr(value)}")


def join_text_parts(content: Any) -> Any:
    """A message's content as one string; text parts are joined with newlines, as separate
    paragraphs, since templates differ in whether they accept part lists at all."""
    if not isinstance(content, list):
        return content
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            got = part.get("type") if isinstance(part, dict) else brief_repr(part)
            raise ValueError(f"content part {index} must be {{'type': 'text', 'text': <string>}}; "
                             f"got type {got!r}: only text content is supported")
        texts.append(part["text"])
    return "\n".join(texts)


def sampling_fields(request: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """The sampling fields the client set, by `SamplingParams` name (stop always as a list)."""
    optional: dict[str, Any] = {
        "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
        "min_p": request.min_p, "seed": request.seed, "ignore_eos": request.ignore_eos,
        "stop_token_ids": request.stop_token_ids,
    }
    given = {name: value for name, value in optional.items() if value is not None}
    given["stop"] = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return given


def brief_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- responses ----

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    """Both the whole response and each streamed chunk: OpenAI uses one shape for the two."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
