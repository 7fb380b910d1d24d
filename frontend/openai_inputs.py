"""From the bytes of an OpenAI request to a `GenerateRequest`: parsing, validation, tokenization, limits.

Everything here is pure apart from the tokenizer calls, and raises `OpenAIError` with a message that
names the offending field and value. The checks run in the order a user fixes things: the body must
be UTF-8 JSON holding an object, the fields must have the right types, the model must be the served
one, the prompt must fit the context with room for one token, and `max_tokens` must fit what is left.

Token limits: a prompt needs `num_prompt_tokens < max_model_len`; a request that names `max_tokens`
needs `num_prompt_tokens + max_tokens <= max_model_len`. A request that leaves it out (chat) or sends
null (either API) may generate up to the context limit: `max_model_len - num_prompt_tokens`.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError
from transformers import PreTrainedTokenizerBase

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.tokenizer import apply_chat_template
from tandem.frontend.openai_errors import OpenAIError
from tandem.frontend.openai_protocol import (ChatCompletionRequest, CompletionRequest, brief_repr,
                                           sampling_params)
from tandem.frontend.types import GenerateRequest

RequestT = TypeVar("RequestT", bound=BaseModel)

# torch.Generator.manual_seed accepts this range; other integers must fit the engine's int64 tensors.
_SEED_RANGE = (-(2**63), 2**64)
_INT64_MAX = 2**63 - 1
_MAX_TOP_LOGPROBS = 20


def parse_body(body: bytes, model_cls: type[RequestT]) -> RequestT:
    """The request model held by `body`; raises OpenAIError for anything that is not one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OpenAIError(f"request body is not valid UTF-8: byte 0x{body[exc.start]:02x} at "
                          f"position {exc.start}") from None
    if not text.strip():
        raise OpenAIError("request body is empty; send a JSON object")
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise OpenAIError(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise OpenAIError(f"request body is not acceptable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OpenAIError(f"request body must be a JSON object, got a JSON {_json_type(data)}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise OpenAIError(f"the model `{requested}` does not exist: this server serves `{served}`",
                          400, param="model", code="model_not_found")


def check_supported(request: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse fields tandem knows but cannot honour, rather than silently ignoring them."""
    refusals = [
        ("n", request.n not in (None, 1),
         f"n={request.n} is not supported: one choice per request; send separate requests"),
        ("presence_penalty", bool(request.presence_penalty), "presence_penalty is not supported"),
        ("frequency_penalty", bool(request.frequency_penalty), "frequency_penalty is not supported"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
        ("stream_options", request.stream_options is not None and not request.stream,
         "stream_options is only allowed when stream is true"),
    ]
    if isinstance(request, CompletionRequest):
        refusals += [
            ("echo", bool(request.echo), "echo is not supported: the response holds only the completion"),
            ("best_of", request.best_of not in (None, 1), f"best_of={request.best_of} is not supported"),
            ("suffix", bool(request.suffix), "suffix is not supported"),
        ]
    else:
        response_type = (request.response_format or {}).get("type", "text")
        refusals += [
            ("tools", bool(request.tools), "tools are not supported"),
            ("functions", bool(request.functions), "functions are not supported"),
            ("response_format", response_type != "text",
             f"response_format {response_type!r} is not supported; only 'text' is"),
        ]
    for param, refused, message in refusals:
        if refused:
            raise OpenAIError(message, param=param)


def completion_request(request: CompletionRequest, request_id: str, tokenizer: PreTrainedTokenizerBase,
                       max_model_len: int) -> GenerateRequest:
    prompt_ids = _completion_prompt_ids(request.prompt, tokenizer)
    check_prompt_length(len(prompt_ids), max_model_len, "prompt")
    max_tokens = resolve_max_tokens(request.max_tokens, len(prompt_ids), max_model_len, "max_tokens")
    params = _sampling_params(request, max_tokens, request.logprobs)
    prompt_text = request.prompt if isinstance(request.prompt, str) else None
    return GenerateRequest(request_id, prompt_ids, params, prompt_text)


def chat_request(request: ChatCompletionRequest, request_id: str, tokenizer: PreTrainedTokenizerBase,
                 max_model_len: int) -> GenerateRequest:
    prompt_ids = _chat_prompt_ids(request, tokenizer)
    check_prompt_length(len(prompt_ids), max_model_len, "messages")
    if request.max_completion_tokens is not None:
        requested, param = request.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = request.max_tokens, "max_tokens"
    max_tokens = resolve_max_tokens(requested, len(prompt_ids), max_model_len, param)
    params = _sampling_params(request, max_tokens, chat_logprobs(request))
    return GenerateRequest(request_id, prompt_ids, params)


def chat_logprobs(request: ChatCompletionRequest) -> int | None:
    """SamplingParams.logprobs for a chat request: None, or how many top alternatives to return."""
    top = request.top_logprobs
    if top is not None and not request.logprobs:
        raise OpenAIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    if top is not None and not 0 <= top <= _MAX_TOP_LOGPROBS:
        raise OpenAIError(f"top_logprobs must be between 0 and {_MAX_TOP_LOGPROBS}, got {top}",
                          param="top_logprobs")
    return (top or 0) if request.logprobs else None


def check_prompt_length(num_prompt_tokens: int, max_model_len: int, param: str) -> None:
    if num_prompt_tokens >= max_model_len:
        raise OpenAIError(
            f"the prompt is {num_prompt_tokens} tokens long, but the model's context length is "
            f"{max_model_len} tokens; the prompt must be shorter than that to leave room for at "
            "least one generated token", param=param)


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int,
                       param: str) -> int:
    room = max_model_len - num_prompt_tokens
    if requested is None:
        return room
    if requested < 1:
        raise OpenAIError(f"{param} must be at least 1, got {requested}", param=param)
    if requested > room:
        raise OpenAIError(
            f"{param}={requested} plus the prompt's {num_prompt_tokens} tokens is "
            f"{requested + num_prompt_tokens} tokens, more than the model's context length of "
            f"{max_model_len} tokens; set {param} to at most {room}", param=param)
    return requested


def _completion_prompt_ids(prompt: str | list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if isinstance(prompt, str):
        # add_special_tokens: a checkpoint whose tokenizer prepends BOS expects it on raw prompts too.
        ids = [int(t) for t in tokenizer.encode(prompt, add_special_tokens=True)]
        if not ids:
            raise OpenAIError("prompt is empty after tokenization", param="prompt")
        return ids
    vocab_size = len(tokenizer)
    for token_id in prompt:
        if not 0 <= token_id < vocab_size:
            raise OpenAIError(f"prompt token id {token_id} is outside the vocabulary: ids must be "
                              f"in [0, {vocab_size})", param="prompt")
    return list(prompt)


def _chat_prompt_ids(request: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if not request.messages:
        raise OpenAIError("messages is empty: send at least one message", param="messages")
    # Templates know system/user/assistant; "developer" is OpenAI's newer name for system.
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in request.messages]
    try:
        return apply_chat_template(tokenizer, messages)
    except ValueError as exc:
        raise OpenAIError(str(exc), param="messages") from None
    except TemplateError as exc:
        raise OpenAIError(f"the model's chat template refused these messages: {exc}",
                          param="messages") from None


def _sampling_params(request: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                     logprobs: int | None) -> SamplingParams:
    _check_engine_int_ranges(request)
    try:
        return sampling_params(request, max_tokens, logprobs)
    except ValueError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]   # SamplingParams messages start with the field's name
        param = field if field in type(request).model_fields else None
        raise OpenAIError(message, param=param) from None


def _check_engine_int_ranges(request: CompletionRequest | ChatCompletionRequest) -> None:
    low, high = _SEED_RANGE
    if request.seed is not None and not low <= request.seed < high:
        raise OpenAIError(f"seed must be in [-2**63, 2**64), got {request.seed}", param="seed")
    if request.top_k is not None and request.top_k > _INT64_MAX:
        raise OpenAIError(f"top_k is too large: {request.top_k}", param="top_k")
    if any(t > _INT64_MAX for t in request.stop_token_ids or []):
        raise OpenAIError("stop_token_ids holds an id too large for any vocabulary", param="stop_token_ids")


def _from_validation_error(exc: ValidationError) -> OpenAIError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "missing":
        message = f"{param} is required"
    elif first["type"] == "value_error":
        message = f"{param}: {str(first['msg']).removeprefix('Value error, ')}"
    else:
        message = f"{param}: {first['msg']}, got {brief_repr(first.get('input'))}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return OpenAIError(message, param=param)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
