"""Several choices, penalties, echo, model defaults and vLLM's extra endpoints, through the official
`openai` client (httpx for the extra endpoints) against a real uvicorn server on 127.0.0.1 in front
of a fake pipeline. The fake varies its reply and its logprobs with the generation's number (the
request id's suffix), so choices can be told apart and best_of has a clear winner."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tandem.contracts.outputs import Logprob
from tandem.contracts.sampling_params import SamplingParams
from tandem.frontend.openai_api import create_app
from tandem.frontend.types import GenerateChunk, GenerateRequest, RequestRejected
from tests.frontend.app_server import AppServer
from tests.frontend.test_openai_api import (MAX_MODEL_LEN, MODEL, PROMPT, PROMPT_IDS, REPLY_IDS,
                                            TOKENIZER, FakePipeline, sampled_logprob, token_text)

DEFAULTS = SamplingParams(temperature=0.3, top_k=7, repetition_penalty=1.15)


def generation_of(request: GenerateRequest) -> int:
    suffix = request.request_id.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def reply_ids(generation: int, num_tokens: int) -> list[int]:
    return [REPLY_IDS[(i + generation) % len(REPLY_IDS)] for i in range(num_tokens)]


def reply(generation: int, num_tokens: int) -> str:
    return "".join(token_text(t) for t in reply_ids(generation, num_tokens))


class VariedPipeline(FakePipeline):
    """Generation g replies with REPLY_IDS rotated by g; generation 1 is the likeliest."""

    def _chunk(self, request: GenerateRequest, index: int, num_tokens: float) -> GenerateChunk:
        chunk = super()._chunk(request, index, num_tokens)
        generation = generation_of(request)
        token = reply_ids(generation, index + 1)[-1]
        logprobs = [Logprob(token, sampled_logprob(index) - abs(generation - 1), {})
                    for _ in chunk.logprobs]
        return GenerateChunk([token], token_text(token), chunk.finish_reason,
                             logprobs=logprobs, num_prompt_tokens=chunk.num_prompt_tokens)


class _Server(AppServer):
    def __init__(self) -> None:
        self.pipeline = VariedPipeline()
        super().__init__(create_app(self.pipeline, TOKENIZER, defaults=DEFAULTS))


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    server = _Server().start()
    yield server
    server.stop()


@pytest.fixture
def pipeline(server: _Server) -> VariedPipeline:
    server.pipeline.reset()
    return server.pipeline


@pytest.fixture
def client(server: _Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=5)


@pytest.fixture
def http(server: _Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=5) as http:
        yield http


def test_n_runs_one_request_per_choice_with_its_own_id_and_seed(client, pipeline):
    out = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=4, seed=11)
    assert [(c.index, c.text) for c in out.choices] == [(g, reply(g, 4)) for g in range(3)]
    assert [r.request_id for r in pipeline.requests] == [f"{out.id}-{g}" for g in range(3)]
    assert [r.params.seed for r in pipeline.requests] == [11, 12, 13]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(PROMPT_IDS), 12)


def test_a_list_of_prompts_gives_n_choices_per_prompt(client, pipeline):
    out = client.completions.create(model=MODEL, prompt=["one", [5, 6, 7]], n=2, max_tokens=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [r.prompt_token_ids for r in pipeline.requests] == [TOKENIZER.encode("one")] * 2 + [[5, 6, 7]] * 2
    assert out.usage.prompt_tokens == len(TOKENIZER.encode("one")) + 3
    assert out.usage.completion_tokens == 8


def test_streamed_chat_choices_interleave_by_index(client, pipeline):
    pipeline.delay_s = 0.005
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=5,
        stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
        usage = chunk.usage or usage
    assert texts == {0: reply(0, 5), 1: reply(1, 5)}
    assert finishes == {0: "length", 1: "length"}
    assert usage.completion_tokens == 10


def test_best_of_returns_the_likeliest_generation(client, pipeline):
    out = client.completions.create(model=MODEL, prompt=PROMPT, best_of=3, max_tokens=4)
    assert [(c.index, c.text, c.logprobs) for c in out.choices] == [(0, reply(1, 4), None)]
    assert [r.params.logprobs for r in pipeline.requests] == [0, 0, 0]   # asked for, to rank
    assert out.usage.completion_tokens == 4


def test_echo_prepends_the_prompt(client, pipeline):
    out = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=3)
    assert out.choices[0].text == PROMPT + reply(0, 3)
    out = client.completions.create(model=MODEL, prompt=PROMPT_IDS, echo=True, max_tokens=1)
    assert out.choices[0].text == TOKENIZER.decode(PROMPT_IDS) + reply(0, 1)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=2,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + reply(0, 2)


def test_penalties_and_vllm_extensions_reach_the_sampling_params(client, pipeline):
    client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, presence_penalty=0.5, frequency_penalty=-0.25,
        logit_bias={"5": 3.5, "17": -100},
        extra_body={"repetition_penalty": 1.3, "min_tokens": 4, "include_stop_str_in_output": True,
                    "skip_special_tokens": False})
    p = pipeline.requests[-1].params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.25, 1.3)
    assert p.logit_bias == {5: 3.5, 17: -100.0}
    assert (p.min_tokens, p.include_stop_str_in_output, p.skip_special_tokens) == (4, True, False)


def test_model_defaults_fill_only_the_fields_not_sent(client, pipeline):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=2, top_p=0.5)
    p = pipeline.requests[-1].params
    assert (p.temperature, p.top_k, p.repetition_penalty, p.top_p) == (0.3, 7, 1.15, 0.5)
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0.9,
                              extra_body={"repetition_penalty": 1.0})
    p = pipeline.requests[-1].params
    assert (p.temperature, p.top_k, p.repetition_penalty) == (0.9, 7, 1.0)


def test_unknown_field_is_refused_through_the_client(client, pipeline):
    with pytest.raises(openai.BadRequestError, match="unknown field 'guided_jsn'"):
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"guided_jsn": {}})
    assert pipeline.requests == []


def test_tokenize_detokenize_version_ping_and_models(client, http):
    tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens == {"count": len(PROMPT_IDS), "max_model_len": MAX_MODEL_LEN, "tokens": PROMPT_IDS}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 1
    assert http.post("/detokenize", json={"tokens": PROMPT_IDS}).json() == {"prompt": PROMPT}
    refused = http.post("/detokenize", json={"tokens": [10**6]})
    assert refused.status_code == 400 and "outside the vocabulary" in refused.json()["error"]["message"]
    assert http.post("/tokenize", json={"prompt": "x", "extra": 1}).status_code == 400
    assert http.get("/version").json()["version"]
    assert http.get("/ping").status_code == http.post("/ping").status_code == 200
    card = client.models.list().data[0]
    assert (card.id, card.max_model_len) == (MODEL, MAX_MODEL_LEN)


def test_a_rejected_choice_ends_the_whole_request(http, pipeline):
    pipeline.fail = RequestRejected("all decode workers are full", 429, "overloaded")
    response = http.post("/v1/completions", json={"prompt": PROMPT, "n": 2})
    assert response.status_code == 429
    assert response.json()["error"]["message"] == "all decode workers are full"
    pipeline.fail_after = 2
    streamed = http.post("/v1/completions", json={"prompt": PROMPT, "n": 2, "stream": True})
    events = [e for e in streamed.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and "all decode workers are full" in events[-2]
    assert pipeline.closed.is_set()
