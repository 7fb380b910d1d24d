"""From the bytes of an OpenAI request to a `GenerateRequest`: parsing, validation, tokenization, limits.

Everything here is pure apart from the tokenizer calls, and raises `RequestError` with a message that
names the offending field and value. The checks run in the order a user fixes things: the body must
be UTF-8 JSON holding an object with no lone surrogates, the fields must have the right types, the
model must be the served one, the prompt must fit the context with room for one token, and
`max_tokens` must fit what is left. The rules themselves (and their limits) live in `request_rules`,
shared with the gRPC API; this module knows only the OpenAI request shapes.

A request that leaves `max_tokens` out (chat) or sends null (either API) may generate up to the
context limit: `max_model_len - num_prompt_tokens`.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError
from transformers import PreTrainedTokenizerBase

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.tokenizer import apply_chat_template
from tandem.frontend.openai_protocol import (ChatCompletionRequest, CompletionRequest, brief_repr,
                                           sampling_fields)
from tandem.frontend.openai_tools import num_tool_chars, template_message, template_tools
from tandem.frontend.request_rules import (RequestError, RequestRules, check_no_lone_surrogates,
                                         check_prompt_chars, check_prompt_ids, check_prompt_length,
                                         checked_logit_bias, resolve_max_tokens, sampling_params)
from tandem.frontend.forced_tools import forced_tool_schema
from tandem.frontend.response_format import checked_json_schema, requested_json_schema
from tandem.frontend.types import GenerateRequest

RequestT = TypeVar("RequestT", bound=BaseModel)

_MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 128    # n and best_of: each choice is a request of its own on the workers
# vLLM's other guided_* fields; guided_json and response_format are honoured (response_format.py).
UNSUPPORTED_GUIDED_FIELDS = ("guided_regex", "guided_choice", "guided_grammar",
                             "guided_decoding_backend", "guided_whitespace_pattern")


def parse_body(body: bytes, model_cls: type[RequestT]) -> RequestT:
    """The request model held by `body`; raises RequestError for anything that is not one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request body is not valid UTF-8: byte 0x{body[exc.start]:02x} at "
                           f"position {exc.start}") from None
    if not text.strip():
        raise RequestError("request body is empty; send a JSON object")
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                           f"column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise RequestError(f"request body is not acceptable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, got a JSON {_json_type(data)}")
    check_no_lone_surrogates(data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None


def check_supported(request: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse fields tandem knows but cannot honour, and combinations it cannot serve, rather
    than silently ignoring them."""
    for param, refused, message in _refusals(request):
        if refused:
            raise RequestError(message, param=param)


def _refusals(request: CompletionRequest | ChatCompletionRequest) -> list[tuple[str, bool, str]]:
    n = request.n
    structured = [name for name in UNSUPPORTED_GUIDED_FIELDS if getattr(request, name) is not None]
    refusals = [
        ("stream_options", request.stream_options is not None and not request.stream,
         "stream_options is only allowed when stream is true"),
        ("n", n is not None and not 1 <= n <= MAX_CHOICES,
         f"n must be between 1 and {MAX_CHOICES}, got {n}"),
        (structured[0] if structured else "", bool(structured),
         f"{', '.join(structured)}: this structured output is not supported by this server; "
         "response_format (json_object, json_schema) and guided_json are"),
    ]
    if isinstance(request, CompletionRequest):
        return refusals + _completion_refusals(request)
    return refusals + [
        ("functions", bool(request.functions), "functions are not supported: send them as "
         "`tools` (openai_tools)"),
    ]


def _completion_refusals(request: CompletionRequest) -> list[tuple[str, bool, str]]:
    n, best_of = request.n or 1, request.best_of
    return [
        ("best_of", best_of is not None and not n <= best_of <= MAX_CHOICES,
         f"best_of must be between n ({n}) and {MAX_CHOICES}, got {best_of}"),
        ("best_of", bool(request.stream) and (best_of or n) > n,
         "best_of greater than n cannot be streamed: the best are known only at the end"),
        ("echo", bool(request.echo) and request.logprobs is not None,
         "echo with logprobs is not supported: prompt logprobs are not computed; ask for echo or "
         "logprobs, not both"),
        ("suffix", bool(request.suffix), "suffix is not supported"),
    ]


def completion_requests(request: CompletionRequest, request_id: str,
                        tokenizer: PreTrainedTokenizerBase, rules: RequestRules,
                        defaults: SamplingParams | None = None) -> list[GenerateRequest]:
    """One `GenerateRequest` per prompt of the request, all with `request_id` for now: the fan-out
    (openai_choices) gives each generation its own."""
    requests = []
    for prompt in request.prompt:
        prompt_ids = completion_prompt_ids(prompt, tokenizer, rules)
        max_tokens = resolve_max_tokens(request.max_tokens, len(prompt_ids), rules, "max_tokens")
        params = _sampling_params(request, max_tokens, request.logprobs, rules, defaults)
        prompt_text = prompt if isinstance(prompt, str) else None
        requests.append(GenerateRequest(request_id, prompt_ids, params, prompt_text))
    return requests


def chat_request(request: ChatCompletionRequest, request_id: str, tokenizer: PreTrainedTokenizerBase,
                 rules: RequestRules, defaults: SamplingParams | None = None) -> GenerateRequest:
    prompt_ids = chat_prompt_ids(request, tokenizer, rules)
    check_prompt_length(len(prompt_ids), rules, "messages")
    if request.max_completion_tokens is not None:
        requested, param = request.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = request.max_tokens, "max_tokens"
    max_tokens = resolve_max_tokens(requested, len(prompt_ids), rules, param)
    params = _sampling_params(request, max_tokens, chat_logprobs(request), rules, defaults,
                              tool_call_schema(request))
    return GenerateRequest(request_id, prompt_ids, params)


def tool_call_schema(request: ChatCompletionRequest) -> str | None:
    """The schema a required or named tool_choice holds the reply to (forced_tools), checked."""
    schema = forced_tool_schema(request)
    if schema is None:
        return None
    response_type = (request.response_format or {}).get("type", "text")
    if request.guided_json is not None or response_type != "text":
        raise RequestError("tool_choice required or a named function already fixes the reply's "
                           "format: leave out response_format and guided_json", "tool_choice")
    return checked_json_schema(schema, "tool_choice")


def chat_logprobs(request: ChatCompletionRequest) -> int | None:
    """SamplingParams.logprobs for a chat request: None, or how many top alternatives to return."""
    top = request.top_logprobs
    if top is not None and not request.logprobs:
        raise RequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    if top is not None and not 0 <= top <= _MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs must be between 0 and {_MAX_TOP_LOGPROBS}, got {top}",
                           "top_logprobs")
    return (top or 0) if request.logprobs else None


def completion_prompt_ids(prompt: str | list[int], tokenizer: PreTrainedTokenizerBase,
                           rules: RequestRules) -> list[int]:
    if isinstance(prompt, str):
        check_prompt_chars(len(prompt), rules, "prompt")
        # add_special_tokens: a checkpoint whose tokenizer prepends BOS expects it on raw prompts too.
        ids = [int(t) for t in tokenizer.encode(prompt, add_special_tokens=True)]
        if not ids:
            raise RequestError("prompt is empty after tokenization", "prompt")
        check_prompt_length(len(ids), rules, "prompt")
        return ids
    check_prompt_ids(prompt, rules, "prompt")
    return list(prompt)


def chat_prompt_ids(request: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase,
                     rules: RequestRules) -> list[int]:
    if not request.messages:
        raise RequestError("messages is empty: send at least one message", "messages")
    num_chars = sum(len(m.content or "") for m in request.messages) + num_tool_chars(request)
    check_prompt_chars(num_chars, rules, "messages")
    messages = [template_message(m, i) for i, m in enumerate(request.messages)]
    try:
        return apply_chat_template(tokenizer, messages, template_tools(request))
    except ValueError as exc:
        raise RequestError(str(exc), "messages") from None
    except TemplateError as exc:
        raise RequestError(f"the model's chat template refused these messages: {exc}",
                           "messages") from None


def _sampling_params(request: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                     logprobs: int | None, rules: RequestRules,
                     defaults: SamplingParams | None, json_schema: str | None = None
                     ) -> SamplingParams:
    given = sampling_fields(request)
    if "logit_bias" in given or request.logit_bias:
        given["logit_bias"] = checked_logit_bias(request.logit_bias or {}, rules)
    if json_schema is None:
        json_schema = requested_json_schema(request.response_format, request.guided_json)
    if json_schema is not None:
        given["json_schema"] = json_schema
    return sampling_params(given, max_tokens, logprobs, rules, defaults)


def _from_validation_error(exc: ValidationError) -> RequestError:
    errors = exc.errors(include_url=False)
    unknown = [".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return RequestError(f"unknown field{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(repr(u) for u in unknown)}: this server does not support "
                            f"{'them' if len(unknown) > 1 else 'it'}; remove "
                            f"{'them' if len(unknown) > 1 else 'it'} from the request", unknown[0])
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
    return RequestError(message, param=param)


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
