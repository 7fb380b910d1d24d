"""KServe v2 / Triton gRPC against a real `tandem serve`, through the `tritonclient` package, with
the tensor conventions of Triton's vLLM backend and of the TensorRT-LLM backend. Greedy text must
equal what the OpenAI API answers for the same prompt on the same server.
"""

from __future__ import annotations

import json
import queue

import jsonschema
import numpy as np
import openai
import pytest

from tandem.engine.tokenizer import load_tokenizer


grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException, triton_to_np_dtype  # noqa: E402

PROMPT = "The harbour wall was lined with boats, and the children counted them one by one."
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def server(dropin_server):
    return dropin_server


@pytest.fixture(scope="module")
def client(server):
    client = grpcclient.InferenceServerClient(server.grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def expected(server) -> tuple[str, int]:
    """(greedy completion text, prompt tokens) from the OpenAI API."""
    api = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
    out = api.completions.create(model=server.model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                 temperature=0)
    assert out.usage.completion_tokens == MAX_TOKENS
    return out.choices[0].text, out.usage.prompt_tokens


def tensor(name: str, value, datatype: str, shape=(1,)):
    t = grpcclient.InferInput(name, list(shape), datatype)
    t.set_data_from_numpy(np.array(value, dtype=triton_to_np_dtype(datatype)).reshape(shape))
    return t


def vllm_inputs(stream: bool, exclude: bool = True, **sampling) -> list:
    params = {"temperature": "0", "max_tokens": MAX_TOKENS, **sampling}  # strings are allowed
    return [tensor("text_input", [PROMPT.encode()], "BYTES"),
            tensor("stream", [stream], "BOOL"),
            tensor("sampling_parameters", [json.dumps(params).encode()], "BYTES"),
            tensor("exclude_input_in_output", [exclude], "BOOL"),
            tensor("return_finish_reason", [True], "BOOL"),
            tensor("return_num_input_tokens", [True], "BOOL"),
            tensor("return_num_output_tokens", [True], "BOOL")]


def trtllm_inputs(stream: bool) -> list:
    # The ensemble's batch dimension: [1, 1] for every input.
    return [tensor("text_input", [PROMPT.encode()], "BYTES", (1, 1)),
            tensor("max_tokens", [MAX_TOKENS], "INT32", (1, 1)),
            tensor("temperature", [0.0], "FP32", (1, 1)),
            tensor("top_k", [1], "INT32", (1, 1)),
            tensor("bad_words", [b""], "BYTES", (1, 1)),
            tensor("stop_words", [b""], "BYTES", (1, 1)),
            tensor("beam_width", [1], "INT32", (1, 1)),
            tensor("stream", [stream], "BOOL", (1, 1)),
            tensor("exclude_input_in_output", [True], "BOOL", (1, 1))]


def stream_infer(client, model: str, requests: list[tuple[str, list]]) -> dict[str, list]:
    """Send each (request id, inputs) on one stream; results (or errors) by request id."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for request_id, inputs in requests:
        client.async_stream_infer(model, inputs, request_id=request_id,
                                  enable_empty_final_response=True)
    client.stop_stream()   # waits for every response
    by_id: dict[str, list] = {request_id: [] for request_id, _ in requests}
    while not results.empty():
        result, error = results.get()
        if error is not None:
            by_id[requests[0][0] if len(requests) == 1 else "error"] = [error]
            continue
        by_id[result.get_response().id].append(result)
    return by_id


def text_of(result) -> str:
    return b"".join(v for v in result.as_numpy("text_output").ravel()).decode()


def is_final(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def test_health_metadata_and_config(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(server.model)
    assert not client.is_model_ready("no-such-model")
    assert client.get_server_metadata().name == "tandem"
    metadata = client.get_model_metadata(server.model)
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs["text_input"] == ("BYTES", [1])
    assert inputs["sampling_parameters"] == ("BYTES", [1])
    assert inputs["max_tokens"] == ("INT32", [1])
    assert {t.name for t in metadata.outputs} >= {"text_output", "finish_reason"}
    config = client.get_model_config(server.model).config
    assert config.model_transaction_policy.decoupled
    assert config.name == server.model
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no-such-model")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_vllm_convention_whole_answer_equals_openai(server, client, expected):
    text, num_prompt = expected
    result = client.infer(server.model, vllm_inputs(stream=False))
    assert text_of(result) == text
    assert result.as_numpy("finish_reason").ravel()[0] == b"length"
    assert result.as_numpy("num_input_tokens").ravel()[0] == num_prompt
    assert result.as_numpy("num_output_tokens").ravel()[0] == MAX_TOKENS
    # Without exclude_input_in_output the answer starts with the prompt, as the vLLM backend's.
    result = client.infer(server.model, vllm_inputs(stream=False, exclude=False))
    assert text_of(result) == PROMPT + text


def test_vllm_convention_streams_deltas(server, client, expected):
    text, _ = expected
    results = stream_infer(client, server.model, [("a", vllm_inputs(stream=True))])["a"]
    assert len(results) >= 3   # several steps of text, then the empty final response
    assert is_final(results[-1]) and not results[-1].get_response().outputs
    steps = results[:-1]
    assert not any(is_final(r) for r in steps)
    assert "".join(text_of(r) for r in steps) == text
    assert [r.as_numpy("finish_reason").ravel()[0] for r in steps][-2:] == [b"None", b"length"]
    assert sum(int(r.as_numpy("num_output_tokens").ravel()[0]) for r in steps) == MAX_TOKENS


def test_trtllm_convention_whole_and_streamed(server, client, expected):
    text, _ = expected
    result = client.infer(server.model, trtllm_inputs(stream=False))
    assert result.as_numpy("text_output").shape == (1, 1)
    assert text_of(result) == text
    results = stream_infer(client, server.model, [("t", trtllm_inputs(stream=True))])["t"]
    assert "".join(text_of(r) for r in results if r.get_response().outputs) == text


def test_one_stream_carries_concurrent_requests_and_errors(server, client, expected):
    text, _ = expected
    bad = vllm_inputs(stream=True, max_tokens=100_000)
    results = stream_infer(client, server.model, [("x", vllm_inputs(stream=True)), ("bad", bad),
                                                  ("y", vllm_inputs(stream=False))])
    assert "".join(text_of(r) for r in results["x"] if r.get_response().outputs) == text
    assert [text_of(r) for r in results["y"] if r.get_response().outputs] == [text]
    (error,) = results["error"]
    assert "max_tokens=100000" in error.message()


@pytest.mark.parametrize("inputs, status, words", [
    ([tensor("text_input", [b"hi"], "BYTES"), tensor("frobnicate", [True], "BOOL")],
     "INVALID_ARGUMENT", "frobnicate"),
    ([tensor("text_input", [b"hi"], "BYTES"),
      tensor("sampling_parameters", [b'{"logit_bias": {"99999": 5}}'], "BYTES")],
     "INVALID_ARGUMENT", "logit_bias key '99999' is not a token id"),
    ([tensor("text_input", [b"hi"], "BYTES"),
      tensor("sampling_parameters", [b'{"logit_bias": [1, 5]}'], "BYTES")],
     "INVALID_ARGUMENT", "logit_bias"),
    ([tensor("text_input", [b"hi"], "BYTES"),
      tensor("sampling_parameters", [b'{"guided_json": {"type": "nonsense"}}'], "BYTES")],
     "INVALID_ARGUMENT", "guided_json: the JSON schema"),
    ([tensor("text_input", [b"hi"], "BYTES"),
      tensor("sampling_parameters", [b'{"guided_decoding": {"regex": "[a-z]+"}}'], "BYTES")],
     "INVALID_ARGUMENT", "supports only \"json\""),
    ([tensor("text_input", [b"hi"], "BYTES"),
      tensor("sampling_parameters", [b'{"presence_penalty": 3}'], "BYTES")],
     "INVALID_ARGUMENT", "presence_penalty must be in [-2, 2]"),
    ([tensor("text_input", [b"hi"], "BYTES"), tensor("beam_width", [4], "INT32")],
     "INVALID_ARGUMENT", "beam_width=4"),
    ([tensor("text_input", [b"hi"], "BYTES"), tensor("temperature", [-1.0], "FP32")],
     "INVALID_ARGUMENT", "temperature"),
    ([tensor("stream", [False], "BOOL")], "INVALID_ARGUMENT", "text_input"),
])
def test_bad_requests_are_invalid_argument(server, client, inputs, status, words):
    with pytest.raises(InferenceServerException) as err:
        client.infer(server.model, inputs)
    assert err.value.status() == f"StatusCode.{status}"
    assert words in err.value.message()


def test_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("no-such-model", [tensor("text_input", [b"hi"], "BYTES")])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in err.value.message()


def test_sampling_parameters_logit_bias_and_penalties_match_openai(server, client):
    """logit_bias, the penalties and min_tokens reach the sampler as on the OpenAI API: the same
    greedy text for the same parameters."""
    tokenizer = load_tokenizer(server.model)
    boat = tokenizer.encode(" boats", add_special_tokens=False)[0]
    api = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
    for extra in ({"logit_bias": {str(boat): 100}},
                  {"presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3,
                   "min_tokens": MAX_TOKENS}):
        openai_text = api.completions.create(model=server.model, prompt=PROMPT,
                                             max_tokens=MAX_TOKENS, temperature=0,
                                             extra_body=extra).choices[0].text
        result = client.infer(server.model, vllm_inputs(stream=False, **extra))
        assert text_of(result) == openai_text
        assert result.as_numpy("num_output_tokens").ravel()[0] == MAX_TOKENS
    assert openai_text != tokenizer.decode([boat] * MAX_TOKENS)
    biased = client.infer(server.model, vllm_inputs(stream=False, logit_bias={boat: 100}))
    assert text_of(biased) == tokenizer.decode([boat] * MAX_TOKENS)


def test_trtllm_penalties_are_honoured(server, client):
    api = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
    expected = api.completions.create(model=server.model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"repetition_penalty": 1.5})
    inputs = trtllm_inputs(stream=False) + [
        tensor("repetition_penalty", [1.5], "FP32", (1, 1)),
        tensor("min_length", [MAX_TOKENS], "INT32", (1, 1))]
    assert text_of(client.infer(server.model, inputs)) == expected.choices[0].text


@pytest.mark.parametrize("form", ["guided_json", "guided_json_text", "guided_decoding"])
def test_sampling_parameters_guided_json_matches_the_schema(server, client, form):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"pet": {"enum": ["cat", "dog"]},
                                               "age": {"type": "integer", "minimum": 0,
                                                       "maximum": 20}},
              "required": ["pet", "age"], "additionalProperties": False}
    guided = {"guided_json": schema, "guided_json_text": json.dumps(schema),
              "guided_decoding": {"json": schema}}[form]
    key = "guided_decoding" if form == "guided_decoding" else "guided_json"
    for stream in (False, True):
        inputs = vllm_inputs(stream=stream, max_tokens=30, **{key: guided})
        if stream:
            results = stream_infer(client, server.model, [("g", inputs)])["g"]
            text = "".join(text_of(r) for r in results if r.get_response().outputs)
        else:
            text = text_of(client.infer(server.model, inputs))
        jsonschema.validate(json.loads(text), schema)
