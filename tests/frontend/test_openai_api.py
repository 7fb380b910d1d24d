"""The OpenAI HTTP API end to end: a real uvicorn server on 127.0.0.1, called by the official `openai`
client (and by httpx for malformed requests), in front of a fake pipeline that streams a fixed reply
one token per chunk and records what it was asked and whether its generator was closed."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry, Counter

from tandem.contracts.outputs import Logprob
from tandem.engine.tokenizer import apply_chat_template, load_tokenizer
from tandem.frontend.openai_api import create_app
from tandem.frontend.types import GenerateChunk, GenerateRequest, RequestRejected
from tests.frontend.app_server import AppServer

TOKENIZER = load_tokenizer(None)
MODEL = "tandem-test"
MAX_MODEL_LEN = 64
REPLY_IDS = TOKENIZER.encode("Tandem streams tokens.")
ALT_IDS = [TOKENIZER.encode("Q")[0], TOKENIZER.encode("Z")[0]]   # the fake's "more likely" tokens
PROMPT = "Hello there"
PROMPT_IDS = TOKENIZER.encode(PROMPT)


def token_text(token_id: int) -> str:
    return TOKENIZER.decode([token_id], skip_special_tokens=False)


def reply_text(num_tokens: int) -> str:
    return "".join(token_text(t) for t in REPLY_IDS[:num_tokens])


def sampled_logprob(index: int) -> float:
    return -2.0 - 0.5 * index


class FakePipeline:
    """Yields REPLY_IDS one token per chunk (forever when `endless`), with logprobs when asked:
    the sampled token at `sampled_logprob(i)`, top alternatives ALT_IDS at -0.1 and -inf."""

    model_name = MODEL
    max_model_len = MAX_MODEL_LEN

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.is_ready = True
        self.is_draining = False
        self.not_ready_reason = "decode pool has 0 of 1 workers ready"
        self.num_cached_tokens = 0
        self.delay_s = 0.0
        self.endless = False
        self.fail: Exception | None = None
        self.fail_after = 0                    # chunks yielded before `fail` is raised
        self.requests: list[GenerateRequest] = []
        self.num_yielded = 0
        self.closed = threading.Event()        # set by the generator's finally block

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self.requests.append(request)
        # Endless ignores max_tokens: only closing the generator can end it.
        num_tokens = math.inf if self.endless else min(len(REPLY_IDS), request.params.max_tokens)
        try:
            index = 0
            while index < num_tokens:
                if self.fail is not None and index == self.fail_after:
                    raise self.fail
                await asyncio.sleep(self.delay_s)
                yield self._chunk(request, index, num_tokens)
                self.num_yielded += 1
                index += 1
        finally:
            self.closed.set()

    def _chunk(self, request: GenerateRequest, index: int, num_tokens: float) -> GenerateChunk:
        token = REPLY_IDS[index % len(REPLY_IDS)]
        finish = None
        if index + 1 == num_tokens:
            finish = "length" if num_tokens == request.params.max_tokens else "stop"
        logprobs = []
        if request.params.logprobs is not None:
            top = list(zip(ALT_IDS, [-0.1, -math.inf]))[: request.params.logprobs]
            logprobs = [Logprob(token, sampled_logprob(index), dict(top))]
        return GenerateChunk([token], token_text(token), finish_reason=finish, logprobs=logprobs,
                             num_prompt_tokens=len(request.prompt_token_ids),
                             num_cached_tokens=self.num_cached_tokens)


class _Server(AppServer):
    def __init__(self) -> None:
        self.pipeline = FakePipeline()
        self.registry = CollectorRegistry()
        Counter("tandem_test_requests", "A metric registered by the test.", registry=self.registry).inc(3)
        super().__init__(create_app(self.pipeline, TOKENIZER, self.registry))


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    server = _Server().start()
    yield server
    server.stop()


@pytest.fixture
def pipeline(server: _Server) -> FakePipeline:
    server.pipeline.reset()
    return server.pipeline


@pytest.fixture
def client(server: _Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=5)


@pytest.fixture
def http(server: _Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=5) as http:
        yield http


# ---- completions ----

def test_completion_passes_params_and_reports_usage(client, pipeline):
    pipeline.num_cached_tokens = 1
    extensions = {"top_k": 5, "min_p": 0.1, "ignore_eos": True}
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0.5, top_p=0.9,
                                    seed=7, stop="xyz", extra_body=extensions)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == MODEL
    assert out.choices[0].text == reply_text(3)
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].logprobs is None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (2, 3, 5)
    assert out.usage.prompt_tokens_details.cached_tokens == 1
    sent = pipeline.requests[-1]
    assert sent.request_id == out.id
    assert (sent.prompt_token_ids, sent.prompt_text) == (PROMPT_IDS, PROMPT)
    p = sent.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (3, 0.5, 0.9, 7, ["xyz"])
    assert (p.top_k, p.min_p, p.ignore_eos, p.logprobs) == (5, 0.1, True, None)


def test_completion_defaults_to_16_tokens(client, pipeline):
    out = client.completions.create(model=MODEL, prompt=PROMPT)
    assert pipeline.requests[-1].params.max_tokens == 16
    assert out.choices[0].text == reply_text(len(REPLY_IDS))
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("prompt, expected_ids", [
    ([5, 6, 7], [5, 6, 7]),
    ([[5, 6, 7]], [5, 6, 7]),
    ([PROMPT], PROMPT_IDS),
])
def test_completion_prompt_forms(client, pipeline, prompt, expected_ids):
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert pipeline.requests[-1].prompt_token_ids == expected_ids


def test_completion_stream_with_usage(client, pipeline):
    pipeline.num_cached_tokens = 2
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply_text(3)
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None, None, "length"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 3)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 2
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_without_usage(client, pipeline):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, stream=True))
    assert [c.choices[0].text for c in chunks] == [token_text(t) for t in REPLY_IDS[:2]]
    assert all(c.usage is None for c in chunks)


def test_completion_logprobs(client, pipeline):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, logprobs=2)
    assert pipeline.requests[-1].params.logprobs == 2
    lp = out.choices[0].logprobs
    tokens = [token_text(t) for t in REPLY_IDS[:3]]
    assert lp.tokens == tokens
    assert lp.token_logprobs == [sampled_logprob(i) for i in range(3)]
    # The n most likely, then the sampled token; -inf is sent as -9999.0.
    assert lp.top_logprobs[1] == {token_text(ALT_IDS[0]): -0.1, token_text(ALT_IDS[1]): -9999.0,
                                  tokens[1]: sampled_logprob(1)}
    assert lp.text_offset == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]


# ---- chat ----

def test_chat_applies_template_and_caps_max_tokens(client, pipeline):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                             {"type": "text", "text": "there"}]}]
    out = client.chat.completions.create(model=MODEL, messages=messages)
    expected_ids = apply_chat_template(TOKENIZER, [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hi\nthere"}])
    sent = pipeline.requests[-1]
    assert sent.prompt_token_ids == expected_ids
    assert sent.request_id == out.id and out.id.startswith("chatcmpl-")
    assert sent.params.max_tokens == MAX_MODEL_LEN - len(expected_ids)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reply_text(len(REPLY_IDS))
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == len(expected_ids)
    assert out.usage.completion_tokens == len(REPLY_IDS)


def test_chat_max_completion_tokens(client, pipeline):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                         max_completion_tokens=2)
    assert out.choices[0].message.content == reply_text(2)
    assert out.choices[0].finish_reason == "length"


def test_chat_stream_with_usage(client, pipeline):
    pipeline.num_cached_tokens = 4
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply_text(3)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 4


def test_chat_logprobs(client, pipeline):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=2, logprobs=True, top_logprobs=1)
    assert pipeline.requests[-1].params.logprobs == 1
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == [token_text(t) for t in REPLY_IDS[:2]]
    assert [c.logprob for c in content] == [sampled_logprob(0), sampled_logprob(1)]
    assert content[0].bytes == list(token_text(REPLY_IDS[0]).encode())
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [(token_text(ALT_IDS[0]), -0.1)]


# ---- models, health, metrics ----

def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_health_follows_pipeline_state(http, pipeline):
    assert http.get("/health").status_code == 200
    pipeline.is_draining = True
    response = http.get("/health")
    assert response.status_code == 503 and "draining" in response.json()["error"]["message"]
    assert http.post("/v1/completions", json={"prompt": PROMPT}).status_code == 503
    pipeline.is_draining, pipeline.is_ready = False, False
    response = http.get("/health")
    assert response.status_code == 503
    assert response.json()["error"]["message"] == ("the server is not ready: decode pool has 0 "
                                                    "of 1 workers ready; retry shortly")
    assert pipeline.requests == []


def test_metrics(http):
    response = http.get("/metrics")
    assert response.status_code == 200
    assert "tandem_test_requests_total 3.0" in response.text


def test_unknown_route_and_method_answer_error_objects(http):
    response = http.get("/v1/nothing")
    assert response.status_code == 404 and "/v1/nothing" in response.json()["error"]["message"]
    assert http.get(COMPLETIONS).status_code == 405


# ---- errors ----

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
FUNCTION_F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _body(**fields) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize("path, body, status, phrases", [
    (COMPLETIONS, b'{"prompt": "hi",', 400, ["not valid JSON"]),
    (COMPLETIONS, b"[1, 2]", 400, ["JSON object", "array"]),
    (COMPLETIONS, b"", 400, ["empty"]),
    (COMPLETIONS, b'{"prompt": "caf\xe9"}', 400, ["UTF-8", "0xe9"]),
    (COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', 400, ["NaN"]),
    (COMPLETIONS, _body(), 400, ["prompt is required"]),
    (COMPLETIONS, _body(prompt=PROMPT, max_tokens="5"), 400, ["max_tokens", "integer", "'5'"]),
    (COMPLETIONS, _body(prompt=PROMPT, stream="yes"), 400, ["stream"]),
    (COMPLETIONS, _body(prompt=PROMPT, model="gpt-4"), 404, ["gpt-4", MODEL]),
    (COMPLETIONS, _body(prompt=PROMPT, max_tokens=0), 400, ["max_tokens", "at least 1", "0"]),
    (COMPLETIONS, _body(prompt=PROMPT, max_tokens=-3), 400, ["max_tokens", "-3"]),
    (COMPLETIONS, _body(prompt=PROMPT, max_tokens=1000), 400,
     ["max_tokens=1000", "2 tokens", f"{MAX_MODEL_LEN} tokens"]),
    (COMPLETIONS, _body(prompt=list(range(10, 80))), 400, ["70 tokens", f"{MAX_MODEL_LEN} tokens"]),
    (COMPLETIONS, _body(prompt=""), 400, ["prompt", "empty"]),
    (COMPLETIONS, _body(prompt=[]), 400, ["prompt", "empty"]),
    (COMPLETIONS, _body(prompt=[5, 5000]), 400, ["5000", str(len(TOKENIZER))]),
    (COMPLETIONS, _body(prompt=["a", 5]), 400, ["prompt", "string or a list of token ids"]),
    (COMPLETIONS, _body(prompt=["a", ""]), 400, ["prompt.1 is empty"]),
    (COMPLETIONS, _body(prompt=PROMPT, n=0), 400, ["n must be between 1 and 128, got 0"]),
    (COMPLETIONS, _body(prompt=PROMPT, n=3, best_of=2), 400, ["best_of must be between n (3)"]),
    (COMPLETIONS, _body(prompt=PROMPT, best_of=2, stream=True), 400, ["cannot be streamed"]),
    (COMPLETIONS, _body(prompt=[PROMPT] * 3, n=50), 400, ["150 generations", "limit is 128"]),
    (COMPLETIONS, _body(prompt=PROMPT, echo=True, logprobs=1), 400, ["echo with logprobs"]),
    (COMPLETIONS, _body(prompt=PROMPT, frobnicate=1, spin=2), 400,
     ["unknown fields 'frobnicate', 'spin'", "does not support them"]),
    (COMPLETIONS, _body(prompt=PROMPT, guided_json=[1]), 400,
     ["guided_json must be a JSON schema"]),
    (COMPLETIONS, _body(prompt=PROMPT, response_format={"type": "yaml"}), 400,
     ["response_format.type must be one of text, json_object, json_schema, got 'yaml'"]),
    (COMPLETIONS, _body(prompt=PROMPT, logit_bias={"x": 1}), 400, ["logit_bias key 'x'"]),
    (COMPLETIONS, _body(prompt=PROMPT, logit_bias={"9999": 1}), 400, ["logit_bias key '9999'"]),
    (COMPLETIONS, _body(prompt=PROMPT, logit_bias={"5": 101}), 400, ["[-100, 100]"]),
    (COMPLETIONS, _body(prompt=PROMPT, presence_penalty=3), 400, ["presence_penalty must be in [-2, 2]"]),
    (COMPLETIONS, _body(prompt=PROMPT, repetition_penalty=0), 400, ["repetition_penalty must be positive"]),
    (COMPLETIONS, _body(prompt=PROMPT, max_tokens=4, min_tokens=9), 400,
     ["min_tokens (9) must not exceed max_tokens (4)"]),
    (CHAT, _body(messages=HI, guided_regex="a+"), 400, ["guided_regex", "structured output"]),
    (CHAT, _body(messages=HI, stream_options={"include_usage": True, "extra": 1}, stream=True), 400,
     ["unknown field 'stream_options.extra'"]),
    (COMPLETIONS, _body(prompt=PROMPT, temperature=-1), 400, ["temperature must be non-negative"]),
    (COMPLETIONS, _body(prompt=PROMPT, top_p=0), 400, ["top_p must be in (0, 1]"]),
    (COMPLETIONS, _body(prompt=PROMPT, stop=["ok", ""]), 400, ["stop strings must be non-empty"]),
    (COMPLETIONS, _body(prompt=PROMPT, stream_options={"include_usage": True}), 400, ["stream_options"]),
    (CHAT, _body(messages=[]), 400, ["messages", "empty"]),
    (CHAT, _body(messages=[{"role": "user", "content": "word " * 80}]), 400, [f"{MAX_MODEL_LEN} tokens"]),
    (CHAT, _body(messages=HI, max_completion_tokens=100), 400, ["max_completion_tokens=100", "at most"]),
    (CHAT, _body(messages=[{"role": "tool", "content": "x"}]), 400,
     ["messages.0", "a tool message needs tool_call_id"]),
    (CHAT, _body(messages=[{"role": "assistant", "content": None}]), 400,
     ["messages.0", "content is required"]),
    (CHAT, _body(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]), 400,
     ["messages.0.tool_calls.0.function.arguments must be a JSON object"]),
    (CHAT, _body(messages=HI, tool_choice="required"), 400, ["tool_choice 'required' needs tools"]),
    (CHAT, _body(messages=HI, tools=[FUNCTION_F]), 400,
     ["its chat template shows no tool-call format", "--tool-call-parser"]),
    (CHAT, _body(messages=HI, tools=[FUNCTION_F], tool_choice={
        "type": "function", "function": {"name": "g"}}), 400, ["names the function 'g'"]),
    (CHAT, _body(messages=HI, functions=[{"name": "f"}]), 400, ["functions are not supported"]),
    (CHAT, _body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, ["image_url"]),
    (CHAT, _body(messages=HI, top_logprobs=2), 400, ["top_logprobs requires logprobs"]),
    (CHAT, _body(messages=HI, tools=[{"type": "function"}]), 400, ["tools.0.function is required"]),
])
def test_bad_requests(http, pipeline, path, body, status, phrases):
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("NotFoundError" if status == 404 else "invalid_request_error")
    for phrase in phrases:
        assert phrase in error["message"]
    assert pipeline.requests == []


def test_prompt_too_long_through_openai_client(client):
    with pytest.raises(openai.BadRequestError, match=f"70 tokens.*{MAX_MODEL_LEN} tokens"):
        client.completions.create(model=MODEL, prompt=list(range(10, 80)))


@pytest.mark.parametrize("stream", [False, True])
def test_rejection_before_first_chunk_keeps_its_status(http, pipeline, stream):
    pipeline.fail = RequestRejected("all decode workers are full", 429, "overloaded")
    response = http.post(COMPLETIONS, json={"prompt": PROMPT, "stream": stream})
    assert response.status_code == 429
    assert response.json()["error"] == {"message": "all decode workers are full", "type": "rate_limit_error",
                                         "param": None, "code": "overloaded"}
    assert pipeline.closed.is_set()


def test_rejection_mid_stream_ends_with_an_error_event(http, client, pipeline):
    pipeline.fail, pipeline.fail_after = RequestRejected("worker lost", 503), 2
    response = http.post(COMPLETIONS, json={"prompt": PROMPT, "stream": True})
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["message"] == "worker lost"
    with pytest.raises(openai.APIError, match="worker lost"):
        list(client.completions.create(model=MODEL, prompt=PROMPT, stream=True))


def test_unexpected_error_is_a_generic_500(http, pipeline):
    pipeline.fail = RuntimeError("secret internals")
    response = http.post(COMPLETIONS, json={"prompt": PROMPT})
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "secret" not in message and "Traceback" not in message
    assert pipeline.requests[-1].request_id in message


# ---- client disconnects ----

def test_disconnect_mid_stream_closes_the_pipeline_generator(server, pipeline):
    pipeline.endless, pipeline.delay_s = True, 0.01
    with httpx.Client(base_url=server.url, timeout=5) as http:
        body = {"prompt": PROMPT, "stream": True, "max_tokens": 50}
        with http.stream("POST", COMPLETIONS, json=body) as response:
            data_lines = (line for line in response.iter_lines() if line.startswith("data: "))
            first, second = next(data_lines), next(data_lines)
            assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == token_text(REPLY_IDS[0])
            assert second
    assert pipeline.closed.wait(timeout=2.0), "the pipeline's generator was not closed"
    num_yielded = pipeline.num_yielded
    time.sleep(0.1)
    assert pipeline.num_yielded == num_yielded


def test_disconnect_while_waiting_for_whole_response_closes_the_generator(server, pipeline):
    pipeline.endless, pipeline.delay_s = True, 0.01
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + COMPLETIONS, json={"prompt": PROMPT, "max_tokens": 50}, timeout=0.2)
    assert pipeline.closed.wait(timeout=2.0), "the pipeline's generator was not closed"
