"""vLLM's serving flags on a real `tandem serve`, through the official `openai` client:
`--served-model-name` with two names, an inline `--chat-template`, `--generation-config vllm`, and
settings given only through the environment (`TANDEM_*`)."""

from __future__ import annotations

import json

import openai
import pytest

from tandem.engine.tokenizer import apply_chat_template, load_tokenizer
from tests.serving_harness import start_server

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}"
            "{% endfor %}<<assistant>>")


@pytest.fixture(scope="module")
def server():
    server = start_server(
        "--model", "random:tiny", "--num-prefill", "0", "--num-decode", "1",
        "--served-model-name", "tiny-chat", "tiny", "--chat-template", TEMPLATE,
        "--generation-config", "vllm", "--log-level", "WARNING", "--drain-timeout-s", "1",
        env={"TANDEM_DEVICE": "cpu", "TANDEM_NUM_KV_BLOCKS": "64", "TANDEM_SEED": "3",
             "TANDEM_NO_SUCH_SETTING": "ignored"})
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_every_served_name(client):
    assert [model.id for model in client.models.list().data] == ["tiny-chat", "tiny"]


def test_chat_uses_the_given_template_under_either_name(client):
    messages = [{"role": "user", "content": "Hello there"}]
    tokenizer = load_tokenizer(None)
    tokenizer.chat_template = TEMPLATE
    expected_prompt_tokens = len(apply_chat_template(tokenizer, messages))
    for name in ("tiny", "tiny-chat"):
        response = client.chat.completions.create(model=name, messages=messages, max_tokens=3,
                                                  temperature=0)
        assert response.model == "tiny-chat"  # responses carry the first name
        assert response.usage.prompt_tokens == expected_prompt_tokens
        assert response.usage.completion_tokens == 3


def test_the_underlying_model_name_is_not_served(client):
    with pytest.raises(openai.NotFoundError) as err:  # 404, as vLLM answers it
        client.completions.create(model="random:tiny", prompt="hi", max_tokens=2)
    assert "`tiny-chat`, `tiny`" in str(err.value)


def test_tandem_bench_chat_backend_on_sharegpt_against_the_server(server, tmp_path):
    from tandem.bench.cli import main as bench_main
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": f"Tell me about block {i} of the cache"},
                           {"from": "gpt", "value": "It holds keys and values."}]}
        for i in range(3)]))
    out = tmp_path / "run.json"
    assert bench_main(["--backend", "openai-chat", "--url", server.http_url,
                       "--dataset", f"sharegpt:{dataset}", "--tokenizer", "builtin",
                       "--percentiles", "50,99.9", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    reply_tokens = len(load_tokenizer(None).encode("It holds keys and values.",
                                                   add_special_tokens=False))
    assert summary["num_requests"] == 3 and summary["num_errors"] == 0
    assert summary["total_output_tokens"] == 3 * reply_tokens  # ignore_eos: exactly the reply
    assert summary["total_input_tokens"] > 0 and summary["duration_s"] > 0
    assert summary["config"]["model"] is None  # learnt from /v1/models: "tiny-chat"
    assert summary["e2e_ms"]["p99.9"] >= summary["e2e_ms"]["p50"]
