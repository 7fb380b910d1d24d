"""Observability of a real `tandem serve` (1 prefill + 1 decode worker): vLLM's metric set with
`model_name`, process metrics, the access log with `X-Request-Id`, the periodic per-worker stats
line, and the Grafana dashboard (docs/grafana/tandem.json), whose every query must name metrics
the frontend exports.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import openai
import pytest
from prometheus_client import CollectorRegistry

from tandem.api.kserve.v2 import inference_pb2 as kpb
from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc
from tandem.contracts.worker_stats import Registration
from tandem.frontend.metrics import FrontendMetrics
from tandem.frontend.planner_metrics import PlannerExporter
from tandem.frontend.request_metrics import RequestRecorder
from tandem.router.worker_registry import WorkerRegistry

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "tandem.json"
PROMPT = ("In a quiet village by the sea, the fishermen mended their nets every morning while "
          "the children ran along the harbour wall, counting boats.")
MAX_TOKENS = 6
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
             "info": ("_info",)}


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries use."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
             for t in p.get("targets", [])]
    assert len(exprs) > 30
    names = set()
    for expr in exprs:
        names |= {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
                  if n.startswith(("vllm:", "tandem_", "process_"))}
    return names


def exported_names(registry: CollectorRegistry) -> set[str]:
    return {family.name + suffix for family in registry.collect()
            for suffix in _SUFFIXES.get(family.type, ("",))}


def test_dashboard_queries_only_registered_metrics():
    workers = WorkerRegistry("m", 16)
    workers.register(Registration("decode-0", "decode", "127.0.0.1:1", 16, "m", 64), 0.0)
    metrics = FrontendMetrics(workers)
    PlannerExporter(metrics.registry, is_advisory=True)
    missing = dashboard_metrics() - exported_names(metrics.registry)
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    panels = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert {"Frontend", "Pools (per worker)", "KV transfer", "Router", "Planner"} <= panels


def test_queue_time_is_the_workers_and_prefill_time_the_rest_of_the_ttft():
    registry = CollectorRegistry()
    recorder = RequestRecorder("m", registry)
    progress = SimpleNamespace(
        request_id="r", num_prompt_tokens=10, num_output_tokens=3, num_cached_tokens=0,
        started_s=100.0, first_token_s=101.0, last_token_s=101.5,
        first_worker=("prefill-0", "prefill"), decode_worker="decode-0", queue_s=0.25)
    recorder.on_finished(progress, "stop")
    labels = {"model_name": "m", "worker": "prefill-0", "role": "prefill"}
    assert registry.get_sample_value("vllm:request_queue_time_seconds_sum", labels) == 0.25
    assert registry.get_sample_value("vllm:request_prefill_time_seconds_sum", labels) == 0.75
    decode = {"model_name": "m", "worker": "decode-0", "role": "decode"}
    assert registry.get_sample_value("vllm:request_decode_time_seconds_sum", decode) == 0.5


@pytest.fixture(scope="module")
def server(dropin_server):
    return dropin_server


def test_request_figures_ids_and_logs(server):
    model = {"model_name": server.model}
    names = [("vllm:prompt_tokens_total", {}), ("vllm:generation_tokens_total", {"role": "decode"}),
             ("vllm:request_prompt_tokens_sum", {}), ("vllm:request_generation_tokens_count", {}),
             ("vllm:request_success_total", {}),
             ("vllm:request_success_total", {"finished_reason": "length"}),
             ("vllm:request_prefill_time_seconds_count", {}),
             ("vllm:request_decode_time_seconds_count", {}),
             ("vllm:request_queue_time_seconds_count", {}),
             ("vllm:time_per_output_token_seconds_count", {}),
             ("vllm:time_to_first_token_seconds_count", {})]
    before = [server.metric(name, **model, **labels) for name, labels in names]
    api = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
    raw = api.completions.with_raw_response.create(
        model=server.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
        extra_headers={"X-Request-Id": "client-run-7"})
    assert raw.headers["x-request-id"] == "client-run-7"
    first = raw.parse()
    second = api.chat.completions.create(model=server.model, max_tokens=MAX_TOKENS,
                                         messages=[{"role": "user", "content": PROMPT}],
                                         extra_body={"ignore_eos": True})
    num_prompt = first.usage.prompt_tokens + second.usage.prompt_tokens
    num_generated = first.usage.completion_tokens + second.usage.completion_tokens
    assert num_generated == 2 * MAX_TOKENS
    after = [server.metric(name, **model, **labels) for name, labels in names]
    grew = {f"{name}{labels or ''}": a - b for (name, labels), a, b in zip(names, after, before)}
    assert grew == {
        "vllm:prompt_tokens_total": num_prompt,
        "vllm:generation_tokens_total{'role': 'decode'}": num_generated,
        "vllm:request_prompt_tokens_sum": num_prompt,
        "vllm:request_generation_tokens_count": 2,
        "vllm:request_success_total": 2,
        "vllm:request_success_total{'finished_reason': 'length'}": 2,
        "vllm:request_prefill_time_seconds_count": 2,
        "vllm:request_decode_time_seconds_count": 2,
        "vllm:request_queue_time_seconds_count": 2,
        "vllm:time_per_output_token_seconds_count": 2,
        "vllm:time_to_first_token_seconds_count": 2}
    # The prompt is long enough to be prefilled on the prefill worker, which measured its queue.
    assert server.metric("vllm:request_prefill_time_seconds_sum", **model, role="prefill") > 0
    queued_s = server.metric("vllm:request_queue_time_seconds_sum", **model, role="prefill")
    assert 0 < queued_s < server.metric("vllm:time_to_first_token_seconds_sum", **model)
    assert server.metric("process_resident_memory_bytes") > 10 * 2**20
    assert "vllm:num_preemptions_total{" in _scrape(server)

    access = _wait_for_line(server, "x-request-id=client-run-7")
    assert '"POST /v1/completions" 200' in access
    assert re.search(r"requests=cmpl-\S+", access), access
    stats = _wait_for_line(server, "(decode): prompt throughput")
    assert re.search(r"running \d+ reqs, waiting \d+ reqs, KV cache usage [\d.]+%", stats)


def test_local_prefill_reports_the_decode_workers_queue_time(server):
    labels = {"model_name": server.model, "role": "decode"}
    count, total = (server.metric(f"vllm:request_queue_time_seconds_{kind}", **labels)
                    for kind in ("count", "sum"))
    api = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
    # Shorter than --remote-prefill-min-tokens: the decode worker prefills it and measures.
    api.completions.create(model=server.model, prompt="Hi", max_tokens=2, temperature=0)
    assert server.metric("vllm:request_queue_time_seconds_count", **labels) == count + 1
    assert server.metric("vllm:request_queue_time_seconds_sum", **labels) > total


def test_grpc_x_request_id_is_echoed_and_logged(server):
    """tandem.v1 and KServe take `x-request-id` metadata as HTTP takes the header: echoed in the
    initial metadata and written on the call's access line with the pipeline's request ids."""
    request = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingOptions(max_tokens=2))
    kserve_request = kpb.ModelInferRequest(model_name=server.model, inputs=[
        kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1],
                                               contents=kpb.InferTensorContents(
                                                   bytes_contents=[PROMPT.encode()]))])
    with grpc.insecure_channel(server.grpc_address) as channel:
        stream = pbgrpc.GenerationStub(channel).Generate(
            request, metadata=[("x-request-id", "grpc-run-1")], timeout=30)
        assert list(stream)[-1].usage.completion_tokens == 2
        assert ("x-request-id", "grpc-run-1") in stream.initial_metadata()
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=kpb.ModelInferRequest.SerializeToString,
                                    response_deserializer=kpb.ModelInferResponse.FromString)
        _, call = infer.with_call(kserve_request, metadata=[("x-request-id", "kserve-run-2")],
                                  timeout=30)
        assert ("x-request-id", "kserve-run-2") in call.initial_metadata()
        with pytest.raises(grpc.RpcError) as err:
            list(pbgrpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(text="hi", model="other"),
                metadata=[("x-request-id", "grpc-run-3")], timeout=30))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert ("x-request-id", "grpc-run-3") in err.value.initial_metadata()
        _, call = infer.with_call(kserve_request, timeout=30)   # no id: one is made
        made = dict(call.initial_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made)
    line = _wait_for_line(server, "x-request-id=grpc-run-1")
    assert '"gRPC /tandem.v1.Generation/Generate" OK' in line
    assert re.search(r"requests=grpc-[0-9a-f]{32}$", line.strip()), line
    line = _wait_for_line(server, "x-request-id=kserve-run-2")
    assert '"gRPC /inference.GRPCInferenceService/ModelInfer" OK' in line
    assert re.search(r"requests=kserve-[0-9a-f]{32}$", line.strip()), line
    assert '" NOT_FOUND ' in _wait_for_line(server, "x-request-id=grpc-run-3")
    assert _wait_for_line(server, f"x-request-id={made}")


def test_running_server_exports_what_the_dashboard_queries(server):
    text = _scrape(server)
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                if line and not line.startswith("#")}
    # The planner's series appear only when the online planner runs (checked on the registry
    # above); KV pulls happened here, the prefill worker served the prompt.
    missing = {n for n in dashboard_metrics() - exported if not n.startswith("tandem_planner_")}
    assert not missing, sorted(missing)


def _scrape(server) -> str:
    import httpx
    return httpx.get(f"{server.http_url}/metrics", timeout=5).text


def _wait_for_line(server, needle: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in list(server.lines):
            if needle in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no log line with {needle!r}:\n" + "".join(server.lines[-30:]))
