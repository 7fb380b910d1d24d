"""`tool_choice` required and named, enforced by the grammar on a real `tandem serve` (the shared
drop-in server: a random tiny llama, whose chat template shows no tool format, so the server has
no tool-call parser). A random model never calls tools on its own: every call below exists because
the grammar held the sampler to it. The prompt is long enough to be prefilled remotely, so the
first token is sampled under the grammar on the prefill worker and the rest on the decode worker.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytest.importorskip("llguidance")

ASK = [{"role": "user", "content": "What will the weather be like in the city by the harbour for "
                                   "the next few days, and what time is it there now?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The forecast for a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone.",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, CLOCK)}


@pytest.fixture(scope="module")
def client(dropin_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=dropin_server.http_url + "/v1", api_key="x", max_retries=0,
                         timeout=60)


def check_call(call) -> str:
    """The call's function name, once its arguments are checked against that tool's schema."""
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return call.function.name


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_gives_valid_calls(client, dropin_server, temperature):
    out = client.chat.completions.create(
        model=dropin_server.model, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
        parallel_tool_calls=False, max_tokens=60, temperature=temperature, seed=3)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert check_call(call) in SCHEMAS


def test_required_streamed_with_parallel_calls(client, dropin_server):
    calls, finishes = [], []
    for chunk in client.chat.completions.create(
            model=dropin_server.model, messages=ASK, tools=[WEATHER, CLOCK],
            tool_choice="required", max_tokens=120, temperature=0, stream=True):
        for choice in chunk.choices:
            assert not choice.delta.content
            calls += choice.delta.tool_calls or []
            finishes.append(choice.finish_reason)
    assert calls, "a required tool choice gave no call"
    assert [c.index for c in calls] == list(range(len(calls)))
    assert all(check_call(c) in SCHEMAS for c in calls)
    # Calls cut by max_tokens end with "length"; only a reply that closed its list ends on its own.
    assert finishes[-1] in ("tool_calls", "length")


def test_named_function_gives_its_arguments(client, dropin_server):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for temperature in (0.0, 1.0):
        out = client.chat.completions.create(
            model=dropin_server.model, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=named,
            max_tokens=40, temperature=temperature, seed=5)
        choice = out.choices[0]
        assert (choice.finish_reason, choice.message.content) == ("stop", None)
        [call] = choice.message.tool_calls
        assert check_call(call) == "get_weather"


def test_none_and_auto_without_a_parser(client, dropin_server):
    out = client.chat.completions.create(model=dropin_server.model, messages=ASK, tools=[WEATHER],
                                         tool_choice="none", max_tokens=8, temperature=0)
    assert not out.choices[0].message.tool_calls
    assert isinstance(out.choices[0].message.content, str)
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
        client.chat.completions.create(model=dropin_server.model, messages=ASK, tools=[WEATHER],
                                       tool_choice="auto", max_tokens=8)
