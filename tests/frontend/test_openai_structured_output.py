"""Structured output through the official `openai` client against a real `tandem serve` (the shared
drop-in server: one prefill and one decode worker on a tiny llama checkpoint). The prompts are long
enough to be prefilled remotely, so the first token is sampled under the grammar on the prefill
worker and the rest on the decode worker, which rebuilds the grammar from the request's schema.
The public gRPC API takes the schema as `SamplingOptions.json_schema`."""

from __future__ import annotations

import json

import grpc
import jsonschema
import openai
import pytest

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc

pytest.importorskip("llguidance")

PROMPT = "Describe one person of the village as a JSON record, with a name, an age and a pet."
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(dropin_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=dropin_server.http_url + "/v1", api_key="x", max_retries=0,
                         timeout=60)


def test_chat_json_schema_parses_and_matches_after_remote_prefill(client, dropin_server):
    remote_before = dropin_server.metric("tandem_remote_prefill_total")
    out = client.chat.completions.create(
        model=dropin_server.model, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert dropin_server.metric("tandem_remote_prefill_total") == remote_before + 1


def test_completions_guided_json_streamed_and_sampled(client, dropin_server):
    stream = client.completions.create(
        model=dropin_server.model, prompt=PROMPT, max_tokens=60, temperature=0.8, seed=7,
        stream=True, extra_body={"guided_json": SCHEMA})
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_grpc_json_schema(dropin_server):
    options = pb.SamplingOptions(max_tokens=60, temperature=0, json_schema=json.dumps(SCHEMA))
    with grpc.insecure_channel(dropin_server.grpc_address) as channel:
        responses = list(pbgrpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(text=PROMPT, sampling=options), timeout=60))
        with pytest.raises(grpc.RpcError) as info:
            bad = pb.SamplingOptions(json_schema='{"type": "nonsense"}')
            list(pbgrpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(text=PROMPT, sampling=bad), timeout=60))
    jsonschema.validate(json.loads("".join(r.text for r in responses)), SCHEMA)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be used for structured output" in info.value.details()


def test_json_object_gives_an_object(client, dropin_server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    out = client.chat.completions.create(
        model=dropin_server.model, messages=[{"role": "user", "content": PROMPT}],
        max_tokens=20, temperature=0, response_format={"type": "json_object"})
    assert out.choices[0].message.content.startswith("{")
    out = client.completions.create(model=dropin_server.model, prompt=PROMPT, max_tokens=20,
                                    temperature=0, extra_body={"response_format": {
                                        "type": "json_schema",
                                        "json_schema": {"name": "ok", "schema": schema}}})
    assert json.loads(out.choices[0].text) in ({"ok": True}, {"ok": False})


def test_unusable_schema_and_other_guided_fields_are_400(client, dropin_server):
    with pytest.raises(openai.BadRequestError, match="cannot be used for structured output"):
        client.chat.completions.create(
            model=dropin_server.model, messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    with pytest.raises(openai.BadRequestError, match="guided_regex"):
        client.completions.create(model=dropin_server.model, prompt="hi",
                                  extra_body={"guided_regex": "[a-z]+"})
