"""Tools through the official `openai` client, end to end: a real uvicorn server in this process in
front of a pipeline that replies with a scripted text one token per chunk, and a tokenizer whose chat
template knows tools, written into tokenizer_config.json in the Llama 3 and the Qwen/Hermes style
(each template is what picks its parser). Checks what the template was given (the prompt the
pipeline saw) and what the client gets back, whole and streamed."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest

from tandem.engine.tokenizer import builtin_tokenizer_dir, load_tokenizer
from tandem.frontend.openai_api import create_app
from tandem.frontend.types import GenerateChunk, GenerateRequest
from tests.frontend.app_server import AppServer

MODEL = "tools-test"

# Llama 3.1's template, cut to what tools need: tools as JSON in the first turn, past calls as
# {"name", "parameters"} JSON, results as the ipython role.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\nAnswer a function call with JSON in the format "
    '{"name": function name, "parameters": dictionary of argument name and its value}.\n'
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls is defined %}"
    "<|im_start|>assistant\n{% for call in message.tool_calls %}"
    '{"name": "{{ call.function.name }}", "parameters": {{ call.function.arguments | tojson }}}'
    "{% endfor %}{{ eos_token }}\n"
    "{% elif message.role == 'tool' %}<|im_start|>ipython\n{{ message.content }}{{ eos_token }}\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen 2.5's template, cut likewise: <tools> in the system turn, <tool_call> blocks, and
# <tool_response> for results (with the call id, to check it arrives).
HERMES_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}</tools>\nReturn each call as <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call>{{ eos_token }}\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls is defined %}"
    "<|im_start|>assistant\n{% for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}{{ eos_token }}\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response id=\"{{ message.tool_call_id }}\">"
    "\n{{ message.content }}\n</tool_response>{{ eos_token }}\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
LLAMA3_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def tools_tokenizer_dir(out: Path, template: str) -> Path:
    """The built-in tokenizer with `template` as its chat template in tokenizer_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(builtin_tokenizer_dir() / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((builtin_tokenizer_dir() / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


class ScriptedPipeline:
    """Replies with `script`, one token per chunk, and records each request."""

    model_name = MODEL
    max_model_len = 4096
    is_ready = True
    is_draining = False
    not_ready_reason = ""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.script = ""
        self.requests: list[GenerateRequest] = []

    def prompt(self) -> str:
        return self.tokenizer.decode(self.requests[-1].prompt_token_ids)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self.requests.append(request)
        ids = self.tokenizer.encode(self.script)
        for index, token in enumerate(ids):
            await asyncio.sleep(0)
            yield GenerateChunk([token], self.tokenizer.decode([token]),
                                finish_reason="stop" if index + 1 == len(ids) else None,
                                num_prompt_tokens=len(request.prompt_token_ids))


class _Server(AppServer):
    def __init__(self, template: str, folder: Path) -> None:
        tokenizer = load_tokenizer(str(tools_tokenizer_dir(folder, template)))
        self.pipeline = ScriptedPipeline(tokenizer)
        super().__init__(create_app(self.pipeline, tokenizer))  # parser picked from the template

    def __enter__(self) -> openai.OpenAI:
        self.start()
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=5)

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Iterator[tuple[openai.OpenAI, ScriptedPipeline]]:
    server = _Server(LLAMA3_TEMPLATE, tmp_path_factory.mktemp("llama3-tokenizer"))
    with server as client:
        yield client, server.pipeline


@pytest.fixture(scope="module")
def hermes(tmp_path_factory) -> Iterator[tuple[openai.OpenAI, ScriptedPipeline]]:
    server = _Server(HERMES_TEMPLATE, tmp_path_factory.mktemp("hermes-tokenizer"))
    with server as client:
        yield client, server.pipeline


def streamed(client: openai.OpenAI, **request) -> tuple[str, list, list[str | None]]:
    """Content, tool-call deltas and finish reasons of a streamed chat request."""
    content, calls, finishes = "", [], []
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **request):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finishes.append(choice.finish_reason)
    return content, calls, finishes


def test_llama3_call_parsed_and_tools_reach_the_template(llama3):
    client, pipeline = llama3
    pipeline.script = LLAMA3_CALL
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert json.dumps(WEATHER_TOOL) in pipeline.prompt()


def test_llama3_streamed_call_is_one_delta_with_no_content(llama3):
    client, pipeline = llama3
    pipeline.script = "<|python_tag|>" + LLAMA3_CALL
    content, calls, finishes = streamed(client, messages=ASK, tools=[WEATHER_TOOL])
    assert content == ""
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert finishes[-1] == "tool_calls"


def test_llama3_plain_answer_streams_as_content(llama3):
    client, pipeline = llama3
    pipeline.script = "It is sunny in Paris."
    content, calls, finishes = streamed(client, messages=ASK, tools=[WEATHER_TOOL])
    assert (content, calls, finishes[-1]) == ("It is sunny in Paris.", [], "stop")


def test_llama3_history_with_calls_and_results(llama3):
    client, pipeline = llama3
    pipeline.script = "Sunny, 21 degrees."
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1",
         "content": [{"type": "text", "text": '{"temp_c": 21,'}, {"type": "text", "text": '"sky": "clear"}'}]},
    ]
    response = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    choice = response.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (
        "Sunny, 21 degrees.", [], "stop")
    prompt = pipeline.prompt()
    assert '<|im_start|>assistant\n{"name": "get_weather", "parameters": {"city": "Paris"}}' in prompt
    assert '<|im_start|>ipython\n{"temp_c": 21,\n"sky": "clear"}' in prompt


def test_hermes_call_after_content(hermes):
    client, pipeline = hermes
    pipeline.script = "Let me check.\n" + HERMES_CALL
    response = client.chat.completions.create(model=MODEL, messages=ASK,
                                              tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="auto")
    choice = response.choices[0]
    assert choice.message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert choice.finish_reason == "tool_calls"
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) + "\n" + json.dumps(TIME_TOOL) in pipeline.prompt()


def test_hermes_streamed_calls_never_leak_markup(hermes):
    client, pipeline = hermes
    pipeline.script = ("Checking.\n" + HERMES_CALL + "\n"
                       + '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    content, calls, finishes = streamed(client, messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL])
    assert content == "Checking.\n"
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2
    assert finishes[-1] == "tool_calls"


def test_hermes_tool_result_keeps_its_call_id(hermes):
    client, pipeline = hermes
    pipeline.script = "Clear."
    messages = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_7", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "content": "clear sky"},
    ]
    client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    prompt = pipeline.prompt()
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            in prompt)
    assert '<tool_response id="call_7">\nclear sky\n</tool_response>' in prompt


def test_tool_choice_none_reads_the_reply_as_content(hermes):
    client, pipeline = hermes
    pipeline.script = HERMES_CALL
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL],
                                              tool_choice="none")
    choice = response.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (
        HERMES_CALL, [], "stop")


def test_named_tool_choice_shows_only_that_tool_and_holds_the_reply_to_its_arguments(hermes):
    client, pipeline = hermes
    pipeline.script = '{"zone": "CET"}'
    named = {"type": "function", "function": {"name": "get_time"}}
    response = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=named)
    choice = response.choices[0]
    assert choice.message.content is None and choice.finish_reason == "stop"   # as OpenAI's
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {"zone": "CET"})
    assert json.loads(pipeline.requests[-1].params.json_schema) == TIME_TOOL["function"]["parameters"]
    assert json.dumps(TIME_TOOL) in pipeline.prompt()
    assert "get_weather" not in pipeline.prompt()
    content, calls, finishes = streamed(client, messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL],
                                        tool_choice=named)
    assert (content, finishes[-1]) == ("", "stop")
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_time", {"zone": "CET"})]


def test_required_tool_choice_holds_the_reply_to_a_list_of_calls(hermes):
    client, pipeline = hermes
    pipeline.script = ('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                       '{"name": "get_time", "parameters": {"zone": "CET"}}]')
    request = dict(messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    choice = client.chat.completions.create(model=MODEL, **request).choices[0]
    expected = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == expected
    assert (choice.message.content, choice.finish_reason) == (None, "tool_calls")
    schema = json.loads(pipeline.requests[-1].params.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]] == [
        ["get_weather"], ["get_time"]]
    content, calls, finishes = streamed(client, **request)
    assert (content, finishes[-1]) == ("", "tool_calls")
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (k, *call) for k, call in enumerate(expected)]
    single = client.chat.completions.create(model=MODEL, parallel_tool_calls=False, **request)
    assert [c.function.name for c in single.choices[0].message.tool_calls] == ["get_weather"]
    assert json.loads(pipeline.requests[-1].params.json_schema)["maxItems"] == 1


def test_auto_and_none_leave_the_reply_free(hermes):
    client, pipeline = hermes
    pipeline.script = "Sunny."
    for choice in ("auto", "none"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL],
                                       tool_choice=choice)
        assert pipeline.requests[-1].params.json_schema is None


def test_forced_tool_choice_with_a_response_format_is_400(hermes):
    client, _ = hermes
    with pytest.raises(openai.BadRequestError, match="already fixes the reply") as info:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL],
                                       tool_choice="required",
                                       response_format={"type": "json_object"})
    assert info.value.body["param"] == "tool_choice"
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError, match="tool_choice: the JSON schema"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[bad_tool],
                                       tool_choice="required")


def test_parallel_tool_calls_false_keeps_the_first(hermes):
    client, pipeline = hermes
    pipeline.script = HERMES_CALL + '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    request = dict(messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL], parallel_tool_calls=False)
    whole = client.chat.completions.create(model=MODEL, **request).choices[0].message.tool_calls
    _, calls, _ = streamed(client, **request)
    assert [c.function.name for c in whole] == [c.function.name for c in calls] == ["get_weather"]
