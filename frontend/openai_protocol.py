"""The OpenAI API's request and response bodies, as pydantic models, and their sampling parameters.

Requests are validated strictly: `"max_tokens": "16"` or `"stream": 1` is a type error (as it is for
OpenAI), not something to coerce. A field the server does not know is refused with a 400 that names
it, rather than silently ignored; fields it knows but cannot honour (structured output's `guided_*`
other than `guided_json`, `suffix`, the legacy `functions`) are refused by
`openai_inputs.check_supported`. `response_format` (json_object, json_schema) and `guided_json`
become the request's JSON schema (response_format.py).

Besides the standard fields (`n`, `best_of`, `echo`, penalties, `logit_bias`, a list of prompts),
both requests take the vLLM extensions that tandem's `SamplingParams` supports: `top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`,
`skip_special_tokens`. Responses follow OpenAI's shapes, plus vLLM's `stop_reason` (the stop string
or token id that ended the output) on each choice.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator



class _StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _RequestModel(BaseModel):
    """A request body: an unknown field is an error that names it, never silently dropped."""
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_RequestModel):
    include_usage: bool | None = None


class _GenerationRequest(_RequestModel):
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
    n: int | None = None                     # choices per prompt
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None   # token id (as a string) -> bias
    min_tokens: int | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # vLLM's structured output: guided_json is honoured (response_format.py); the others are
    # known so that the refusal can name them.
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None

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
    # One prompt (text or token ids) or a list of them; always a list once validated.
    prompt: list[str | list[int]]
    max_tokens: int | None = 16              # None: up to the context limit
    logprobs: int | None = None              # top-n, completions style
    echo: bool | None = None
    best_of: int | None = None               # generated per prompt; the n likeliest are returned
    suffix: str | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_list(cls, value: Any) -> Any:
        return prompt_list(value)


class FunctionCall(_StrictModel):
    name: str
    arguments: str                           # JSON text, as OpenAI sends it


class ToolCall(_StrictModel):
    """A call an assistant message made earlier in the conversation."""
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_StrictModel):
    # "developer" is what recent OpenAI clients send in place of "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None               # a list of text parts arrives here joined
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant only
    tool_call_id: str | None = None          # tool only: the call this message answers

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        return join_text_parts(value)

    @model_validator(mode="after")
    def _check_tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls is only allowed on assistant messages, not {self.role}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id: the id of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls "
                             "may leave it null)")
        return self


class FunctionDefinition(_RequestModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ToolDefinition(_RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_RequestModel):
    name: str


class NamedToolChoice(_RequestModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None            # None: up to the context limit
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    # None: "auto" with tools, "none" without (OpenAI's rule).
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call per reply
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def prompt_list(value: Any) -> list[str | list[int]]:
    """The prompts of a completions request: one text or token-id list, or a list of them."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        return [_one_prompt(p, f"prompt.{i}") for i, p in enumerate(value)]
    return [_one_prompt(value, "prompt")]


def _one_prompt(value: Any, name: str) -> str | list[int]:
    if isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value)):
        if not value:
            raise ValueError(f"{name} is empty")
        return value
    raise ValueError(f"{name} must be a string or a list of token ids (integers), got "
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


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos", "stop_token_ids",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
                   "include_stop_str_in_output", "skip_special_tokens")


def sampling_fields(request: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """The sampling fields the client set, by `SamplingParams` name (stop always as a list);
    `logit_bias` keys are still strings here (openai_inputs checks and converts them)."""
    given = {name: getattr(request, name) for name in _SAMPLING_FIELDS
             if getattr(request, name) is not None}
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


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


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


class DeltaToolCall(ToolCallOut):
    """A whole call in one delta: `index` numbers the calls of one choice."""
    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


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
    root: str | None = None
    max_model_len: int | None = None          # vLLM's extension: the context length served


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
