"""`tandem serve` lifecycle: aggregated mode, YAML config, a prefill worker that dies (requests then
prefill on the decode worker), and draining on SIGTERM with no process left behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import openai
import pytest

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc
from tandem.engine.tokenizer import load_tokenizer
from tests.serving_harness import start_server, worker_pids

pytest.importorskip("nixl")

LONG_PROMPT = "Tell me a long story about a lighthouse keeper and the ships that pass. " * 3


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); check its state.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_aggregated_serving_from_a_yaml_config_routes_by_kv_overlap(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("num_prefill: 0\nnum_decode: 2\nnum_kv_blocks: 128\ndevice: cpu\n"
                      "router_mode: kv\n")
    server = start_server("--config", str(config))
    try:
        client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0)
        first = client.completions.create(model="random:tiny", prompt=LONG_PROMPT, max_tokens=4)
        assert first.usage.completion_tokens == 4
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        time.sleep(0.5)  # the worker's KV events reach the router
        tokenizer = load_tokenizer(None)
        base = tokenizer.encode(LONG_PROMPT)
        for question in ("Why?", "How?", "When?"):
            out = client.completions.create(model="random:tiny", prompt=LONG_PROMPT + question,
                                            max_tokens=4)
            ids = tokenizer.encode(LONG_PROMPT + question)
            shared = next(i for i, (a, b) in enumerate(zip(base + [-1], ids)) if a != b)
            # Every full block of the shared prompt is found on the worker that computed it.
            assert out.usage.prompt_tokens_details.cached_tokens == shared // 16 * 16 >= 32
        assert server.metric("tandem_local_prefill_total") == 4
        assert server.metric("tandem_remote_prefill_total") == 0
        # Worker stats arrive with heartbeats, so one may still count only the first requests.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            hits = [server.metric("vllm:prefix_cache_hits_total", worker=f"decode-{i}")
                    for i in range(2)]
            if max(hits) >= 3 * 32:
                break
            time.sleep(0.2)
        assert sorted(hits)[0] == 0 and sorted(hits)[1] >= 3 * 32  # all on one worker
    finally:
        assert server.stop() == 0


def test_dead_prefill_worker_leaves_prefill_to_the_decode_worker_and_drain_leaves_nothing():
    server = start_server("--num-prefill", "1", "--num-decode", "1", "--device", "cpu",
                          "--num-kv-blocks", "128", "--remote-prefill-min-tokens", "1",
                          "--drain-timeout-s", "20")
    pids = worker_pids(server)
    assert len(pids) == 2
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0,
                           timeout=30)
    try:
        # A long streamed request is in flight when SIGTERM arrives: it must finish.
        results: dict = {}

        def long_request() -> None:
            stream = client.completions.create(model="random:tiny", prompt="Drain me",
                                               max_tokens=200, stream=True,
                                               extra_body={"ignore_eos": True})
            chunks = [c for c in stream if c.choices]
            results["text"] = "".join(c.choices[0].text for c in chunks)
            results["finish"] = chunks[-1].choices[0].finish_reason

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.0)
        prefill_pid = min(pids)  # the prefill worker is started first
        os.kill(prefill_pid, signal.SIGKILL)
        out = client.completions.create(model="random:tiny", prompt=LONG_PROMPT, max_tokens=4)
        assert out.usage.completion_tokens == 4
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises((openai.APIStatusError, openai.APIConnectionError)):
            client.completions.create(model="random:tiny", prompt="refused", max_tokens=2)
        thread.join(timeout=60)
        assert results.get("text") and results.get("finish") == "length"
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_remote_prefill_without_free_decode_blocks_is_recomputed():
    """The decode worker has no blocks to pull into: it recomputes the prompt once it has."""
    server = start_server("--num-prefill", "1", "--num-decode", "1", "--device", "cpu",
                          "--num-kv-blocks", "24", "--remote-prefill-min-tokens", "1")
    hog_prompt = list(range(100, 164))  # 64 tokens; with 310 more it fills all 24 blocks
    hog = pb.GenerateRequest(token_ids=pb.TokenIds(ids=hog_prompt), sampling=pb.SamplingOptions(
        max_tokens=310, temperature=0, ignore_eos=True))
    other = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(300, 400))),
                               sampling=pb.SamplingOptions(max_tokens=5, temperature=0))
    try:
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = pbgrpc.GenerationStub(channel)
            hog_call = stub.Generate(hog, timeout=120)
            num_hog_tokens = 0
            for response in hog_call:
                num_hog_tokens += len(response.token_ids)
                if num_hog_tokens >= 250:  # the hog holds 20 blocks, the other prompt needs 7
                    break
            other_tokens = [t for r in stub.Generate(other, timeout=120) for t in r.token_ids]
            num_hog_tokens += sum(len(r.token_ids) for r in hog_call)
        assert len(other_tokens) == 5 and num_hog_tokens == 310
        assert server.metric("tandem_kv_transfer_fallback_total") == 1
        assert server.metric("tandem_remote_prefill_total") == 2
    finally:
        assert server.stop() == 0
