"""`tandem bench` against fake streaming servers started in this process (OpenAI HTTP and gRPC)."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from tandem.bench import add_bench_parser
from tandem.bench.cli import main
from tandem.engine.tokenizer import load_tokenizer
from tests.bench.fake_servers import (CHAT_TEMPLATE_TOKENS, MODEL_NAME, FakeGrpcServer,
                                      FakeOpenAIServer)

SUMMARY_KEYS = {"ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "request_throughput",
                "output_token_throughput", "goodput", "prefix_hit_rate", "num_requests",
                "num_errors", "ideal_prefix_hit_rate", "config"}
NEW_SUMMARY_KEYS = {"duration_s", "input_token_throughput", "total_input_tokens",
                    "total_output_tokens"}


@pytest.fixture
def openai_server():
    server = FakeOpenAIServer()
    yield server
    server.close()


@pytest.fixture
def grpc_server():
    server = FakeGrpcServer()
    yield server
    server.close()


def _run(tmp_path, *flags: str) -> dict:
    out = tmp_path / "summary.json"
    assert main([*flags, "--no-progress", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_openai_random_run_counts_every_token(openai_server, tmp_path):
    plot = tmp_path / "bench.png"
    summary = _run(tmp_path, "--url", openai_server.url, "--num-requests", "8",
                   "--input-len", "40", "--output-len", "5", "--max-concurrency", "4",
                   "--request-rate", "200", "--save-requests", "--plot", str(plot),
                   "--slo", "ttft_ms=5000", "itl_ms=5000")
    assert set(summary) == SUMMARY_KEYS | NEW_SUMMARY_KEYS | {"per_request", "started_at_epoch_s", "client_gc_pauses_ms"}
    assert summary["num_requests"] == 8 and summary["num_errors"] == 0
    assert abs(summary["started_at_epoch_s"] - time.time()) < 60  # the wall clock of this run
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])
    assert summary["output_token_throughput"] == pytest.approx(5 * summary["request_throughput"])
    records = summary["per_request"]
    assert sorted(r["request_index"] for r in records) == list(range(8))
    assert all(r["output_tokens"] == 5 and r["prompt_tokens"] == 40 for r in records)
    assert all(len(r["itl_ms"]) == 4 and r["ttft_ms"] > 0 for r in records)
    assert summary["itl_ms"]["p50"] >= 1.0  # the server sleeps 2 ms between tokens
    # The model name came from /v1/models; every request streamed with usage and ignore_eos.
    assert len(openai_server.served) == 8
    for served in openai_server.served:
        assert served.body["model"] == MODEL_NAME and served.body["ignore_eos"] is True
        assert served.body["stream"] is True and served.max_tokens == 5
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_openai_shared_prefix_hit_rate_matches_ideal_when_serial(openai_server, tmp_path):
    summary = _run(tmp_path, "--url", openai_server.url, "--model", "m",
                   "--dataset", "shared-prefix", "--num-groups", "2", "--prompts-per-group", "3",
                   "--system-prompt-len", "32", "--question-len", "8", "--output-len", "2",
                   "--max-concurrency", "1", "--block-size", "16")
    assert "per_request" not in summary
    assert summary["num_requests"] == 6 and summary["num_errors"] == 0
    # 4 of 6 prompts find their group's two 16-token blocks cached: 4 * 32 / (6 * 40).
    assert summary["ideal_prefix_hit_rate"] == pytest.approx(128 / 240)
    assert summary["prefix_hit_rate"] == pytest.approx(summary["ideal_prefix_hit_rate"])


def test_openai_failures_are_counted_not_raised(tmp_path):
    server = FakeOpenAIServer(fail_every=3)
    try:
        summary = _run(tmp_path, "--url", server.url, "--model", "m", "--num-requests", "9",
                       "--input-len", "8", "--output-len", "3", "--save-requests")
    finally:
        server.close()
    assert summary["num_requests"] == 9 and summary["num_errors"] == 3
    errors = [r["error"] for r in summary["per_request"] if r["error"]]
    assert len(errors) == 3 and all(e.startswith("HTTP 500") for e in errors)
    assert summary["output_token_throughput"] == pytest.approx(3 * summary["request_throughput"])


def test_grpc_multi_turn_sends_each_turn_after_the_previous_one(grpc_server, tmp_path):
    summary = _run(tmp_path, "--backend", "grpc", "--url", grpc_server.url,
                   "--dataset", "multi-turn", "--num-conversations", "3", "--turns", "3",
                   "--user-len", "16", "--output-len", "4", "--save-requests")
    assert summary["num_requests"] == 9 and summary["num_errors"] == 0
    assert all(r["output_tokens"] == 4 and len(r["itl_ms"]) == 3
               for r in summary["per_request"])
    prompt_tokens = sorted(r["prompt_tokens"] for r in summary["per_request"])
    assert prompt_tokens == [16] * 3 + [36] * 3 + [56] * 3  # 16 user + 4 reply + 16 user...
    served = grpc_server.served
    num_ordered_pairs = 0
    for later in served:
        for earlier in served:
            if (len(earlier.prompt) < len(later.prompt)
                    and later.prompt[:len(earlier.prompt)] == earlier.prompt):
                assert later.received_s >= earlier.finished_s
                num_ordered_pairs += 1
    assert num_ordered_pairs == 3 * 3  # turns (0,1), (0,2), (1,2) of each conversation
    # Turn 2 finds turn 1's one full block, turn 3 turn 2's two: 3 * (16 + 32) / 3 * (16+36+56).
    assert summary["ideal_prefix_hit_rate"] == pytest.approx(144 / 324)
    assert summary["prefix_hit_rate"] == pytest.approx(144 / 324)


def test_add_bench_parser_registers_the_subcommand():
    parser = argparse.ArgumentParser(prog="tandem")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--backend", "grpc", "--request-rate", "4",
                              "--slo", "ttft_ms=500", "itl_ms=50"])
    assert args.command == "bench" and args.backend == "grpc"
    assert args.request_rate == 4.0 and args.slo == ["ttft_ms=500", "itl_ms=50"]
    assert callable(args.func)


def test_openai_chat_backend_on_a_sharegpt_file(openai_server, tmp_path):
    conversations = [
        {"conversations": [{"from": "human", "value": f"question number {i} about kv caches"},
                           {"from": "gpt", "value": " ".join(["word"] * (4 + i))}]}
        for i in range(4)]
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps(conversations))
    tokenizer = load_tokenizer(None)
    summary = _run(tmp_path, "--backend", "openai-chat", "--url", openai_server.url,
                   "--dataset", f"sharegpt:{dataset}", "--tokenizer", "builtin",
                   "--percentiles", "50,99.9", "--save-requests")
    assert summary["num_requests"] == 4 and summary["num_errors"] == 0
    assert set(summary) == SUMMARY_KEYS | NEW_SUMMARY_KEYS | {"per_request", "started_at_epoch_s", "client_gc_pauses_ms"}
    sent = {served.prompt: served for served in openai_server.served}
    assert set(sent) == {f"question number {i} about kv caches" for i in range(4)}
    for text, served in sent.items():
        reply = " ".join(["word"] * (4 + int(text.split()[2])))
        assert served.max_tokens == len(tokenizer.encode(reply, add_special_tokens=False))
        assert served.body["model"] == MODEL_NAME and served.body["stream"] is True
    records = summary["per_request"]
    # The opening role chunk is not a token: one gap fewer than tokens, none lost.
    assert all(len(r["itl_ms"]) == r["output_tokens"] - 1 for r in records)
    assert summary["total_output_tokens"] == sum(s.max_tokens for s in sent.values())
    # Prompt tokens as the server counted them (6 words + its chat markers).
    assert summary["total_input_tokens"] == 4 * (6 + CHAT_TEMPLATE_TOKENS)
    assert summary["input_token_throughput"] == pytest.approx(
        summary["total_input_tokens"] / summary["duration_s"])
    assert summary["ttft_ms"]["p99.9"] >= summary["ttft_ms"]["p50"] > 0


def test_openai_chat_backend_decodes_token_prompts_with_the_tokenizer(openai_server, tmp_path,
                                                                       capsys):
    summary = _run(tmp_path, "--backend", "openai-chat", "--url", openai_server.url,
                   "--num-requests", "2", "--input-len", "6", "--output-len", "3",
                   "--tokenizer", "builtin")
    assert summary["num_errors"] == 0
    assert all(isinstance(s.prompt, str) and s.prompt for s in openai_server.served)
    assert main(["--backend", "openai-chat", "--url", openai_server.url, "--num-requests", "1",
                 "--no-progress"]) == 2
    assert "needs a tokenizer: pass --tokenizer" in capsys.readouterr().err
