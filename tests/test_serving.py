"""`tandem serve` end to end on a CPU: 1 prefill and 1 decode worker as real processes, gRPC
between them, KV blocks over NIXL, the OpenAI API through the official client and the public gRPC
API. Greedy outputs must equal the offline engine's on the same checkpoint.
"""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import openai
import pytest

from tandem import LLM, SamplingParams
from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc
from tests.checkpoints import make_checkpoint
from tests.serving_harness import start_server

pytest.importorskip("nixl")

BLOCK = 16
MAX_TOKENS = 12
# Long enough for remote prefill (--remote-prefill-min-tokens 16) and several KV blocks.
PROMPT = ("In a quiet village by the sea, the fishermen mended their nets every morning while "
          "the children ran along the harbour wall, counting boats.")
GREEDY = dict(temperature=0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_checkpoint("llama", tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model=model_dir, block_size=BLOCK, num_kv_blocks=256)


@pytest.fixture(scope="module")
def server(model_dir):
    server = start_server("--model", model_dir, "--num-prefill", "1", "--num-decode", "1",
                          "--device", "cpu", "--num-kv-blocks", "256",
                          "--remote-prefill-min-tokens", "16", "--drain-timeout-s", "10")
    yield server
    assert server.stop() == 0


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)


def expected_text(offline, prompt: str, **kwargs) -> tuple[str, list[int]]:
    out = offline.generate(prompt, SamplingParams(**{**GREEDY, **kwargs}))[0].outputs[0]
    return out.text, out.token_ids


def block_bytes(offline) -> int:
    kv = offline.engine.runner.kv_cache
    return kv[0].numel() * kv.element_size()


def test_completion_equals_offline_and_moves_the_prompt_blocks(server, client, offline, model_dir):
    text, _ = expected_text(offline, PROMPT)
    before = server.metric("tandem_kv_transfer_bytes_total")
    remote_before = server.metric("tandem_remote_prefill_total")
    out = client.completions.create(model=model_dir, prompt=PROMPT, **GREEDY)
    assert out.choices[0].text == text
    assert out.usage.completion_tokens == MAX_TOKENS
    num_prompt = out.usage.prompt_tokens
    num_blocks = -(-num_prompt // BLOCK)
    assert server.metric("tandem_remote_prefill_total") == remote_before + 1
    moved = server.metric("tandem_kv_transfer_bytes_total") - before
    assert moved == num_blocks * block_bytes(offline)
    # The frontend said a pull would follow, so the decode worker kept its path warm meanwhile
    # (the count reaches the frontend with a heartbeat). A tiny prompt's prefill on a CPU can end,
    # and its pull start, before that word arrives (then nothing needs warming), so a few more
    # remote prefills are allowed before it counts as missing.
    for attempt in range(5):
        if attempt:
            client.completions.create(model=model_dir, prompt=f"{PROMPT} Once more, {attempt}.",
                                      **GREEDY)
        deadline = time.monotonic() + 4
        while server.metric("tandem_kv_warm_reads_total") == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        if server.metric("tandem_kv_warm_reads_total") > 0:
            break
    assert server.metric("tandem_kv_warm_reads_total") > 0, "no warming read in 5 remote prefills"


def test_streaming_completion_and_chat_equal_offline(client, offline, model_dir):
    text, _ = expected_text(offline, PROMPT + " Again.")
    stream = client.completions.create(model=model_dir, prompt=PROMPT + " Again.", stream=True,
                                       stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    messages = [{"role": "user", "content": PROMPT}]
    chat_ids = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
    chat_text = offline.generate([chat_ids], SamplingParams(**GREEDY))[0].outputs[0].text
    reply = client.chat.completions.create(model=model_dir, messages=messages, **GREEDY)
    assert reply.choices[0].message.content == chat_text
    streamed = client.chat.completions.create(model=model_dir, messages=messages, stream=True,
                                              **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat_text


def test_grpc_generate_equals_offline_tokens(server, offline):
    _, ids = expected_text(offline, PROMPT + " By gRPC.")
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pbgrpc.GenerationStub(channel)
        request = pb.GenerateRequest(text=PROMPT + " By gRPC.",
                                     sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS,
                                                                 temperature=0))
        responses = list(stub.Generate(request, timeout=60))
    assert [t for r in responses for t in r.token_ids] == ids
    assert responses[-1].finish_reason == "length"
    assert responses[-1].usage.completion_tokens == MAX_TOKENS


def test_shared_prefix_pulls_only_missing_blocks(server, client, offline, model_dir):
    prefix = PROMPT * 2  # several full blocks the decode worker will keep cached
    client.completions.create(model=model_dir, prompt=prefix + " First question?", **GREEDY)
    before = server.metric("tandem_kv_transfer_bytes_total")
    second = prefix + " A different second question, longer than the first one?"
    out = client.completions.create(model=model_dir, prompt=second, **GREEDY)
    assert out.choices[0].text == expected_text(offline, second)[0]
    tokenizer = offline.tokenizer
    shared = 0
    a, b = tokenizer.encode(prefix + " First question?"), tokenizer.encode(second)
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    num_blocks, num_cached = -(-len(b) // BLOCK), shared // BLOCK
    assert num_cached >= 2
    moved = server.metric("tandem_kv_transfer_bytes_total") - before
    assert moved == (num_blocks - num_cached) * block_bytes(offline)


def wait_for_idle_workers(server, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        usage = server.metric("vllm:kv_cache_usage_perc")
        running = server.metric("vllm:num_requests_running")
        if usage == 0 and running == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"blocks still in use: usage {usage}, running {running}")


def test_client_disconnect_frees_blocks_on_both_workers(server, model_dir):
    body = {"model": model_dir, "prompt": PROMPT * 2, "max_tokens": 300, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.http_url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            got = [next(lines) for _ in range(6)]  # three events and their blank lines
            assert any(line.startswith("data: {") for line in got)
    wait_for_idle_workers(server)


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, ["JSON"]),
    ({"prompt": "hi", "max_tokens": -1}, 400, ["max_tokens"]),
    ({"prompt": "hi", "max_tokens": 10**9}, 400, ["max_tokens", "512"]),
    ({"prompt": "word " * 600}, 400, ["512"]),
    ({"prompt": "hi", "model": "no-such-model"}, 404, ["no-such-model", "does not exist"]),
    (b'{"prompt": "\xff\xfe"}', 400, ["UTF-8"]),
    ({"prompt": ""}, 400, ["empty"]),
    ({"prompt": "hi", "seed": 2**63}, 400, ["seed"]),
    ({"prompt": "hi", "top_k": 2**31}, 400, ["top_k"]),
    ({"prompt": "hi", "stop_token_ids": [2**32]}, 400, ["stop_token_ids"]),
    (b'{"prompt": "hi", "model": "\\udc80"}', 400, ["surrogate"]),
    (b'{"prompt": "a\\ud800"}', 400, ["surrogate"]),
    ({"prompt": "hi", "stop": ["s" * 4000] * 100}, 400, ["limit is 64"]),
    ({"prompt": "x" * 10_000_000}, 413, ["bytes"]),
])
def test_bad_inputs_get_400_and_the_server_keeps_serving(server, client, model_dir, body, status,
                                                         words):
    if isinstance(body, dict):
        body = {"model": model_dir, **body}
        response = httpx.post(f"{server.http_url}/v1/completions", json=body, timeout=30)
    else:
        response = httpx.post(f"{server.http_url}/v1/completions", content=body, timeout=30,
                              headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word.lower() in message.lower(), message
    assert client.completions.create(model=model_dir, prompt="still alive?",
                                     max_tokens=2).usage.completion_tokens == 2


def test_grpc_bad_inputs_get_invalid_argument(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pbgrpc.GenerationStub(channel)
        for request, words in [
            (pb.GenerateRequest(), "no prompt"),
            (pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_tokens=10**6)),
             "max_tokens"),
            (pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(top_p=2)), "top_p"),
            (pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(temperature=float("nan"))),
             "temperature must be a finite number"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(text="hi", model="other"), timeout=30))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "`other` does not exist" in err.value.details()


def test_health_and_metrics(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(server.grpc_address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert httpx.get(f"{server.http_url}/health").status_code == 200
    text = httpx.get(f"{server.http_url}/metrics").text
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
                 "tandem_kv_transfer_bytes_total", "tandem_kv_transfer_seconds",
                 "tandem_remote_prefill_total", "tandem_local_prefill_total"):
        assert name in text, name
    assert 'role="prefill",worker="prefill-0"' in text


def test_grpc_clients_may_reuse_a_request_id(server):
    """Two concurrent calls with the same client request id are two requests."""
    request = pb.GenerateRequest(text="same id", request_id="mine",
                                 sampling=pb.SamplingOptions(max_tokens=6, temperature=0))
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pbgrpc.GenerationStub(channel)
        first, second = stub.Generate(request, timeout=60), stub.Generate(request, timeout=60)
        a, b = list(first), list(second)
    assert [t for r in a for t in r.token_ids] == [t for r in b for t in r.token_ids]
    assert a[-1].usage.completion_tokens == 6 and a[0].request_id == "mine"


def cancel_after_three_tokens(server) -> None:
    request = pb.GenerateRequest(text=PROMPT * 2, sampling=pb.SamplingOptions(
        max_tokens=300, temperature=0, ignore_eos=True))
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = pbgrpc.GenerationStub(channel).Generate(request, timeout=60)
        for _, _ in zip(range(3), call):
            pass
        call.cancel()


def test_grpc_cancel_frees_blocks(server):
    cancel_after_three_tokens(server)
    wait_for_idle_workers(server)


def test_many_grpc_cancels_leave_the_server_up(server):
    """The access log read the call's peer after a cancel had freed the call: the frontend
    crashed (SIGSEGV) within a dozen cancels like these."""
    for _ in range(16):
        threads = [threading.Thread(target=cancel_after_three_tokens, args=(server,))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert server.process.poll() is None
    wait_for_idle_workers(server)


@pytest.mark.parametrize("backend", ["openai", "grpc"])
def test_tandem_bench_against_the_real_server(server, model_dir, tmp_path, backend):
    import json
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    url = server.http_url if backend == "openai" else server.grpc_address
    subprocess.run([sys.executable, "-m", "tandem.launcher.cli", "bench", "--backend", backend, "--url", url,
                    "--model", model_dir, "--dataset", "shared-prefix", "--num-groups", "2",
                    "--prompts-per-group", "3", "--system-prompt-len", "64", "--question-len", "8",
                    "--output-len", "4", "--max-concurrency", "1", "--no-progress", "--out",
                    str(out)], check=True, timeout=120, capture_output=True)
    summary = json.loads(out.read_text())
    assert summary["num_requests"] == 6 and summary["num_errors"] == 0
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        assert set(summary[key]) == {"p50", "p90", "p99", "mean"}
    assert summary["ttft_ms"]["p50"] > 0 and summary["output_token_throughput"] > 0
    # One request at a time: every prompt after a group's first finds the system prompt cached.
    assert summary["prefix_hit_rate"] > 0.5 * summary["ideal_prefix_hit_rate"] > 0
