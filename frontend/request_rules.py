"""The rules every client request must follow, shared by the OpenAI HTTP API and the public gRPC API.

Both APIs parse their own wire format, then ask these functions whether the request can be served;
each rule raises `RequestError` with a message written for the person who sent the request (it names
the field, the value and the limit) and the name of the offending parameter. The HTTP API answers it
as a 400 (or 413) error object with `param`; gRPC as INVALID_ARGUMENT with the same message. Nothing
here does I/O or needs a tokenizer: rules that depend on the model take a `RequestRules`.

The rules and their limits:

- model: empty means the served model; a name that is none of its served names is not found
  (status 404, code `model_not_found`: HTTP 404 and gRPC NOT_FOUND, as vLLM answers it).
- text: no lone UTF-16 surrogates (JSON's `"\\ud800"`) anywhere: they cannot be encoded as UTF-8,
  so neither the tokenizer nor a response naming them could handle them.
- prompt size before tokenization: at most `max_prompt_chars` characters, by default the context
  length times the longest token's characters. A prompt longer than that cannot fit the context
  (no token covers more text), so tokenizing it, which takes seconds for megabytes on the one
  tokenizer thread, is refused before it starts.
- prompt tokens: ids in [0, vocab_size); fewer than `max_model_len`, leaving room for one token.
- max_tokens: at least 1, and prompt plus max_tokens within `max_model_len`; unset means up to the
  context limit.
- numbers must fit what the wire to the workers carries (proto/tandem/api/v1/generation.proto): seed
  an int64, top_k an int32, stop_token_ids uint32; floats finite and within float32's range (a larger
  temperature would arrive as infinity; NaN and infinity would silently become greedy or uniform).
- stop strings: at most `max_stop_strings` (64) strings of at most `max_stop_chars` (8,192)
  characters together. OpenAI allows 4; 64 covers every end-of-turn list of real chat templates. The
  matcher reads each output character once (engine/stop_matcher.py), but building it costs time and
  memory in the total length, and every worker call carries the list.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.stop_matcher import prepare_stop_matcher

# What the wire carries (generation.proto and worker.proto): the engine's values must fit these.
INT64_RANGE = (-(2**63), 2**63 - 1)
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 8192



class RequestError(ValueError):
    """A request the client must change: `message` for the client, `param` the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The limits an operator may set (FrontendConfig.limits); see the module docstring."""
    max_request_bytes: int = 4 * 2**20    # HTTP body and gRPC message; 128k tokens take ~1 MiB
    max_prompt_chars: int | None = None   # None: max_model_len x the longest token's characters
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_chars: int = MAX_STOP_CHARS  # all stop strings of a request together

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_stop_strings", "max_stop_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be at least 1 (or unset to derive it from the "
                             f"context length), got {self.max_prompt_chars}")


@dataclass(frozen=True, slots=True)
class RequestRules:
    """What the rules need to know about the served model, and the limits chosen for it."""
    model_name: str
    max_model_len: int
    vocab_size: int                  # prompt token ids must be below this
    max_prompt_chars: int            # a text prompt (or all chat contents) longer is refused
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_chars: int = MAX_STOP_CHARS
    served_model_names: tuple[str, ...] = ()  # every name `model` may be; (): model_name only

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names the model answers to, the one responses carry first."""
        return self.served_model_names or (self.model_name,)

    def serves(self, requested: str | None) -> bool:
        """Empty means the served model; any other name must be one of its names."""
        return not requested or requested in self.model_names

    @classmethod
    def for_vocab(cls, model_name: str, max_model_len: int, vocab: Mapping[str, int] | Iterable[str],
                  vocab_size: int, limits: RequestLimits = RequestLimits()) -> RequestRules:
        """Rules whose prompt-characters bound, unless set, is the context length times the
        longest token (as the vocabulary spells it, which is never shorter than its text)."""
        max_prompt_chars = limits.max_prompt_chars
        if max_prompt_chars is None:
            longest = max((len(token) for token in vocab), default=1)
            max_prompt_chars = max_model_len * max(longest, 1)
        return cls(model_name, max_model_len, vocab_size, max_prompt_chars,
                   limits.max_stop_strings, limits.max_stop_chars)


# ---- text and model ----

def check_model(requested: str | None, rules: RequestRules) -> None:
    if not rules.serves(requested):
        served = ", ".join(f"`{name}`" for name in rules.model_names)
        # vLLM's words first: clients and scripts written for it match on them.
        raise RequestError(f"The model `{requested}` does not exist. This server serves "
                           f"{served}.", "model", status=404, code="model_not_found")


def find_lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path (`messages.0.content`) of the first string in `value` holding a lone surrogate."""
    if isinstance(value, str):
        return path if _has_surrogate(value) else None
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        child = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and _has_surrogate(key):
            return child.encode("utf-8", "backslashreplace").decode()
        found = find_lone_surrogate(item, child)
        if found is not None:
            return found
    return None


def check_no_lone_surrogates(value: Any) -> None:
    path = find_lone_surrogate(value)
    if path is not None:
        raise RequestError(f"{path or 'the request'} holds a lone UTF-16 surrogate (such as "
                           "\\ud800), which is not a character: send valid Unicode text",
                           path.split(".", 1)[0] or None)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---- prompt ----

def check_prompt_chars(num_chars: int, rules: RequestRules, param: str) -> None:
    """Before tokenization: a text this long cannot fit the context whatever it says."""
    if num_chars > rules.max_prompt_chars:
        raise RequestError(
            f"the {param} is {num_chars} characters long, more than this server's limit of "
            f"{rules.max_prompt_chars} characters ({rules.max_model_len}-token context); "
            "shorten it", param)


def check_prompt_ids(token_ids: Sequence[int], rules: RequestRules, param: str) -> None:
    if not token_ids:
        raise RequestError(f"the {param} is empty: at least one token is needed", param)
    for token_id in token_ids:
        if not 0 <= token_id < rules.vocab_size:
            raise RequestError(f"prompt token id {token_id} is outside the vocabulary: ids must be "
                               f"in [0, {rules.vocab_size})", param)
    check_prompt_length(len(token_ids), rules, param)


def check_prompt_length(num_prompt_tokens: int, rules: RequestRules, param: str) -> None:
    if num_prompt_tokens >= rules.max_model_len:
        raise RequestError(
            f"the prompt is {num_prompt_tokens} tokens long, but the model's context length is "
            f"{rules.max_model_len} tokens; the prompt must be shorter than that to leave room for "
            "at least one generated token", param)


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, rules: RequestRules,
                       param: str = "max_tokens") -> int:
    """The request's token budget: `requested`, or (None) all the room the context leaves."""
    room = rules.max_model_len - num_prompt_tokens
    if requested is None:
        return room
    if requested < 1:
        raise RequestError(f"{param} must be at least 1, got {requested}", param)
    if requested > room:
        raise RequestError(
            f"{param}={requested} plus the prompt's {num_prompt_tokens} tokens is "
            f"{requested + num_prompt_tokens} tokens, more than the model's context length of "
            f"{rules.max_model_len} tokens; set {param} to at most {room}", param)
    return requested


# ---- sampling ----

def check_stop_strings(stop: Sequence[str], rules: RequestRules, param: str = "stop") -> None:
    if len(stop) > rules.max_stop_strings:
        raise RequestError(f"{param} holds {len(stop)} strings; the limit is "
                           f"{rules.max_stop_strings} stop strings per request", param)
    total = sum(len(s) for s in stop)
    if total > rules.max_stop_chars:
        raise RequestError(f"{param} strings are {total} characters long together; the limit is "
                           f"{rules.max_stop_chars} characters per request", param)


def check_int(value: int, param: str, low: int, high: int) -> None:
    if not low <= value <= high:
        raise RequestError(f"{param} must be in [{low}, {high}], got {value}", param)


def check_float(value: float, param: str) -> None:
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise RequestError(f"{param} must be a finite number within float32's range, got {value}",
                           param)


def checked_logit_bias(bias: Mapping[Any, Any], rules: RequestRules,
                       param: str = "logit_bias") -> dict[int, float]:
    """A `logit_bias` map as the engine takes it (token id -> bias), each id and value checked.
    Ids may come as numbers or as digit strings (JSON keys are strings: OpenAI sends them so)."""
    checked: dict[int, float] = {}
    for key, value in bias.items():
        text = str(key).strip()
        if isinstance(key, bool) or not text.isdigit() or not 0 <= int(text) < rules.vocab_size:
            raise RequestError(f"{param} key '{key}' is not a token id in [0, "
                               f"{rules.vocab_size})", param)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{param} values must be numbers, got {value!r} for '{key}'",
                               param)
        check_float(value, param)
        checked[int(text)] = float(value)
    return checked


def sampling_params(given: Mapping[str, Any], max_tokens: int, logprobs: int | None,
                    rules: RequestRules, defaults: SamplingParams | None = None) -> SamplingParams:
    """The engine's parameters from the fields a client set (`given`, by SamplingParams name) over
    `defaults`; every value is checked against the wire's ranges first."""
    _check_wire_ranges(given)
    stop = list(given.get("stop") or [])
    check_stop_strings(stop, rules)
    base = {f.name: getattr(defaults, f.name) for f in fields(SamplingParams)} if defaults else {}
    values = {**base, **given, "max_tokens": max_tokens, "logprobs": logprobs, "stop": stop}
    try:
        params = SamplingParams(**values)
    except ValueError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]   # SamplingParams messages start with the field's name
        raise RequestError(message, field if field in values else None) from None
    if stop:
        prepare_stop_matcher(stop)   # built here, off the event loop; the pipeline finds it cached
    return params


def _check_wire_ranges(given: Mapping[str, Any]) -> None:
    for name in ("temperature", "top_p", "min_p"):
        if given.get(name) is not None:
            check_float(given[name], name)
    if given.get("seed") is not None:
        check_int(given["seed"], "seed", *INT64_RANGE)
    if given.get("top_k") is not None:
        check_int(given["top_k"], "top_k", -INT32_MAX - 1, INT32_MAX)
    for token_id in given.get("stop_token_ids") or []:
        check_int(token_id, "stop_token_ids", 0, UINT32_MAX)
