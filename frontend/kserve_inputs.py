"""What a KServe v2 inference request asks for, read from the tensor names existing clients send.

Two conventions are in use and both are accepted, in any mix:

- Triton's vLLM backend: `text_input`, `stream`, `sampling_parameters` (a JSON object with vLLM's
  `SamplingParams` names; values may be strings, as that backend converts them),
  `exclude_input_in_output`, and `return_finish_reason`, `return_cumulative_logprob`,
  `return_num_input_tokens`, `return_num_output_tokens`. The sampling parameters include the
  penalties, `min_tokens`, `logit_bias` (token id -> bias) and structured output as
  `guided_json` (a schema, or its JSON text) or the backend's own
  `guided_decoding: {"json": schema}`: the same SamplingParams and the same checks as the OpenAI
  API (request_rules.checked_logit_bias, response_format).
- The TensorRT-LLM backend's ensemble: `text_input`, `max_tokens`, `stream`, `temperature`,
  `top_k`, `top_p`, `random_seed`, `stop_words`, `end_id`, the penalties and `min_length` (as
  `min_tokens`), and knobs that tandem's sampler does not have (`bad_words`, `beam_width`,
  `length_penalty`, logits): those are accepted at their neutral value (what clients such as
  genai-perf send by default) and refused otherwise, by name.

Nothing is silently ignored: an input no convention defines is INVALID_ARGUMENT naming it. A request
that sets no `max_tokens` gets 16, vLLM's default, which the vLLM backend inherits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tandem.frontend.kserve_tensors import Tensor
from tandem.frontend.request_rules import RequestError

DEFAULT_MAX_TOKENS = 16

# Inputs by name: (datatype, shape) as ModelMetadata and ModelConfig describe them.
INPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "text_input": ("BYTES", (1,)), "stream": ("BOOL", (1,)),
    "sampling_parameters": ("BYTES", (1,)), "exclude_input_in_output": ("BOOL", (1,)),
    "return_finish_reason": ("BOOL", (1,)), "return_cumulative_logprob": ("BOOL", (1,)),
    "return_num_input_tokens": ("BOOL", (1,)), "return_num_output_tokens": ("BOOL", (1,)),
    "max_tokens": ("INT32", (1,)), "temperature": ("FP32", (1,)), "top_k": ("INT32", (1,)),
    "top_p": ("FP32", (1,)), "random_seed": ("UINT64", (1,)), "stop_words": ("BYTES", (-1,)),
    "end_id": ("INT32", (1,)), "pad_id": ("INT32", (1,)), "bad_words": ("BYTES", (-1,)),
    "beam_width": ("INT32", (1,)), "min_length": ("INT32", (1,)),
    "repetition_penalty": ("FP32", (1,)), "presence_penalty": ("FP32", (1,)),
    "frequency_penalty": ("FP32", (1,)), "length_penalty": ("FP32", (1,)),
    "return_log_probs": ("BOOL", (1,)), "return_context_logits": ("BOOL", (1,)),
    "return_generation_logits": ("BOOL", (1,)),
}
OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "text_output": ("BYTES", (-1,)), "finish_reason": ("BYTES", (-1,)),
    "num_input_tokens": ("UINT32", (-1,)), "num_output_tokens": ("UINT32", (-1,)),
    "cumulative_logprob": ("FP32", (-1,)),
}
# TensorRT-LLM inputs with no counterpart here, and the one value that changes nothing.
_NEUTRAL = {"beam_width": 1, "length_penalty": 1.0, "return_log_probs": False,
            "return_context_logits": False, "return_generation_logits": False}
# TensorRT-LLM inputs that are SamplingParams fields under another name (or the same).
_TRTLLM_SAMPLING = (("temperature", "temperature", float), ("top_p", "top_p", float),
                    ("top_k", "top_k", int), ("random_seed", "seed", int),
                    ("repetition_penalty", "repetition_penalty", float),
                    ("presence_penalty", "presence_penalty", float),
                    ("frequency_penalty", "frequency_penalty", float),
                    ("min_length", "min_tokens", int))
# sampling_parameters keys and how their values are read.
_JSON_TYPES = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
               "max_tokens": int, "ignore_eos": bool, "include_stop_str_in_output": bool,
               "skip_special_tokens": bool, "stop": list, "stop_token_ids": list,
               "presence_penalty": float, "frequency_penalty": float,
               "repetition_penalty": float, "min_tokens": int, "logit_bias": dict,
               "guided_json": object, "guided_decoding": dict}
# sampling_parameters keys at their neutral value; other values are refused by name.
_JSON_NEUTRAL = {"n": 1, "best_of": 1, "use_beam_search": False}


@dataclass(slots=True)
class KServeInputs:
    text: str
    stream: bool = False
    exclude_input: bool = False
    max_tokens: int | None = None
    given: dict[str, Any] = field(default_factory=dict)   # SamplingParams fields the client set
    guided_json: Any = None   # the JSON schema asked for, compiled with the prompt's checks
    returns: set[str] = field(default_factory=set)        # extra outputs asked for
    batched: bool = False   # text_input came as [1, 1]: answer with the batch dimension too


def parse_inputs(tensors: dict[str, Tensor], requested_outputs: list[str]) -> KServeInputs:
    unknown = sorted(set(tensors) - set(INPUTS))
    if unknown:
        raise RequestError(f"unknown input(s) {', '.join(unknown)}: this model takes "
                           f"{', '.join(INPUTS)}", unknown[0])
    text_input = tensors.get("text_input")
    if text_input is None or len(text_input.values) != 1:
        raise RequestError("text_input must hold exactly one string, the prompt", "text_input")
    inputs = KServeInputs(_text(text_input.values[0], "text_input"),
                          batched=len(text_input.shape) == 2)
    inputs.stream = bool(_scalar(tensors, "stream", False))
    inputs.exclude_input = bool(_scalar(tensors, "exclude_input_in_output", False))
    _read_trtllm(tensors, inputs)
    if "sampling_parameters" in tensors:
        _read_sampling_json(_scalar(tensors, "sampling_parameters", b"{}"), inputs)
    unknown_out = sorted(set(requested_outputs) - set(OUTPUTS))
    if unknown_out:
        raise RequestError(f"unknown output(s) {', '.join(unknown_out)}: this model gives "
                           f"{', '.join(OUTPUTS)}", unknown_out[0])
    inputs.returns = {name for name in OUTPUTS
                      if name in requested_outputs or _scalar(tensors, f"return_{name}", False)}
    if "cumulative_logprob" in inputs.returns:
        inputs.given["logprobs"] = 0
    return inputs


def _read_trtllm(tensors: dict[str, Tensor], inputs: KServeInputs) -> None:
    for name, neutral in _NEUTRAL.items():
        value = _scalar(tensors, name, neutral)
        if value != neutral:
            raise RequestError(f"{name}={value} is not supported by this server (only {neutral})",
                               name)
    if _strings(tensors, "bad_words"):
        raise RequestError("bad_words is not supported by this server", "bad_words")
    if "max_tokens" in tensors:
        inputs.max_tokens = int(_scalar(tensors, "max_tokens", 0))
    for name, key, kind in _TRTLLM_SAMPLING:
        if name in tensors:
            inputs.given[key] = kind(_scalar(tensors, name, 0))
    stop = _strings(tensors, "stop_words")
    if stop:
        inputs.given["stop"] = stop
    if "end_id" in tensors:
        inputs.given["stop_token_ids"] = [int(_scalar(tensors, "end_id", 0))]


def _read_sampling_json(data: bytes, inputs: KServeInputs) -> None:
    try:
        params = json.loads(_text(data, "sampling_parameters"))
    except json.JSONDecodeError as exc:
        raise RequestError(f"sampling_parameters is not valid JSON: {exc}",
                           "sampling_parameters") from None
    if not isinstance(params, dict):
        raise RequestError("sampling_parameters must be a JSON object", "sampling_parameters")
    for key, value in params.items():
        if key in _JSON_NEUTRAL:
            if _coerce(key, value, type(_JSON_NEUTRAL[key])) != _JSON_NEUTRAL[key]:
                raise RequestError(f"sampling_parameters.{key}={value!r} is not supported by "
                                   f"this server (only {_JSON_NEUTRAL[key]!r})", key)
        elif key not in _JSON_TYPES:
            raise RequestError(f"sampling_parameters.{key} is not supported; supported keys: "
                               f"{', '.join(_JSON_TYPES)}", key)
        elif value is not None:
            _set_sampling_value(inputs, key, _coerce(key, value, _JSON_TYPES[key]))


def _set_sampling_value(inputs: KServeInputs, key: str, value: Any) -> None:
    if key == "max_tokens":
        inputs.max_tokens = value
    elif key in ("guided_json", "guided_decoding"):
        if inputs.guided_json is not None:
            raise RequestError("give either guided_json or guided_decoding, not both", key)
        inputs.guided_json = value if key == "guided_json" else _guided_decoding_json(value)
    else:
        inputs.given[key] = value


def _guided_decoding_json(spec: dict[str, Any]) -> Any:
    """The schema of the vLLM backend's `guided_decoding` ({"json": schema}); other kinds are
    refused by name, as the OpenAI API refuses guided_regex and the rest."""
    others = sorted(key for key, value in spec.items() if key != "json" and value is not None)
    if others or spec.get("json") is None:
        raise RequestError(f"sampling_parameters.guided_decoding supports only \"json\" (a JSON "
                           f"schema) here, got {', '.join(others) or 'no schema'}",
                           "guided_decoding")
    return spec["json"]


def _coerce(key: str, value: Any, kind: type) -> Any:
    """A JSON value as `kind`; the vLLM backend's clients often send numbers as strings."""
    try:
        if kind is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("true", "1")
        if kind is object:
            return value
        if kind in (list, dict):
            if isinstance(value, str):
                value = [value] if key == "stop" else json.loads(value)
            if not isinstance(value, kind):
                raise TypeError(f"not a JSON {'array' if kind is list else 'object'}")
            return value
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"sampling_parameters.{key}={value!r} is not a valid "
                           f"{kind.__name__}", key) from exc


def _scalar(tensors: dict[str, Tensor], name: str, default: Any) -> Any:
    tensor = tensors.get(name)
    if tensor is None:
        return default
    if len(tensor.values) != 1:
        raise RequestError(f"input `{name}` must hold one value, got {len(tensor.values)}", name)
    return tensor.values[0]


def _strings(tensors: dict[str, Tensor], name: str) -> list[str]:
    """A BYTES input's non-empty strings (clients send [""] for "none")."""
    tensor = tensors.get(name)
    if tensor is None:
        return []
    return [s for s in (_text(v, name) for v in tensor.values) if s]


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise RequestError(f"input `{name}` is not UTF-8 text", name) from None
