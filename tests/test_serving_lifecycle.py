"""`tandem serve` lifecycle: aggregated mode, YAML config, a prefill worker that dies mid-request,
and draining on SIGTERM with no process left behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

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


def test_aggregated_serving_from_a_yaml_config(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("num_prefill: 0\nnum_decode: 2\nnum_kv_blocks: 128\ndevice: cpu\n")
    server = start_server("--config", str(config))
    try:
        client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0)
        for _ in range(2):
            out = client.completions.create(model="random:tiny", prompt=LONG_PROMPT, max_tokens=4)
            assert out.usage.completion_tokens == 4
        assert server.metric("tandem_local_prefill_total") == 2
        assert server.metric("tandem_remote_prefill_total") == 0
        assert server.metric("vllm:num_requests_running", role="decode") == 0
        assert "decode-1" in httpx.get(f"{server.http_url}/metrics").text
    finally:
        assert server.stop() == 0


def test_dead_prefill_worker_fails_the_request_and_drain_leaves_nothing():
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
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="random:tiny", prompt=LONG_PROMPT, max_tokens=4)
        assert err.value.status_code in (502, 503)
        assert "prefill" in str(err.value)
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
