"""`tandem serve --launcher ray` on a Ray cluster of simulated nodes on this machine (Ray's
cluster utilities, everything on 127.0.0.1): a head node with no CPUs for actors, a node offering
`prefill_node` and one offering `decode_node`, so that prefill and decode actors land on different
nodes and KV blocks cross between them over NIXL. Outputs must equal the local launcher's; a
killed actor must come back with no block held anywhere; the Deployment interface the planner uses
must add and remove actors while serving.

One cluster and one server serve the whole module: starting Ray and three workers on a 2-core
machine takes most of a minute.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import grpc
import httpx
import openai
import pytest

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc
from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tests.internal_secret import internal_metadata
from tests.serving_harness import REGISTERED, Server, start_server

ray = pytest.importorskip("ray")
pytest.importorskip("nixl")
pytestmark = pytest.mark.slow

MAX_TOKENS = 12
# Long enough for remote prefill (--remote-prefill-min-tokens 16) and several 16-token blocks.
PROMPTS = ["In a quiet village by the sea, the fishermen mended their nets every morning while "
           "the children ran along the harbour wall, counting boats.",
           "The committee met on a grey Tuesday to decide, once and for all, where the new bridge "
           "across the river would stand."]
GRPC_PROMPT = PROMPTS[0] + " By gRPC."
STREAM_TOKENS = 600  # long enough to be killed mid-stream, short enough to finish after migrating
                    # on a busy 2-core CPU
SERVE_ARGS = ["--device", "cpu", "--num-prefill", "1", "--num-decode", "2",
              "--num-kv-blocks", "128", "--remote-prefill-min-tokens", "16",
              "--drain-timeout-s", "5"]
# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_outputs():
    """The local launcher's greedy outputs for the module's prompts (then it stops, freeing CPU)."""
    server = start_serve(SERVE_ARGS)
    try:
        return {"completions": [complete(server, p) for p in PROMPTS],
                "grpc": generate_grpc(server, GRPC_PROMPT)}
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def cluster(local_outputs):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"prefill_node": 1}, node_ip_address="127.0.0.1")
    cluster.add_node(num_cpus=3, resources={"decode_node": 3}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", namespace="tandem")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def server(cluster):
    server = start_serve([*SERVE_ARGS, "--launcher", "ray", "--ray-address", cluster.address,
                          "--prefill-resources", "prefill_node=1",
                          "--decode-resources", "decode_node=1"])
    yield server
    assert server.stop() == 0
    assert not tandem_actors(), "actors left after tandem serve stopped"


# ---- tests ---------------------------------------------------------------------------------------

def test_actors_spread_over_the_pools_nodes(server):
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    placed = {worker_id: nodes[ray.get(actor.node_id.remote())]
              for worker_id, actor in tandem_actors().items()}
    assert sorted(placed) == ["decode-0", "decode-1", "prefill-0"]
    assert "prefill_node" in placed["prefill-0"]
    assert all("decode_node" in placed[w] for w in ("decode-0", "decode-1"))
    # Each worker's resources were reserved as a one-bundle placement group first.
    bundles = sorted(tuple(sorted(g["bundles"][0])) for g in created_groups())
    assert bundles.count(("CPU", "decode_node")) == 2 and ("CPU", "prefill_node") in bundles


def test_outputs_equal_the_local_launchers_with_kv_over_nixl(server, local_outputs):
    moved_before = server.metric("tandem_kv_transfer_bytes_total")
    remote_before = server.metric("tandem_remote_prefill_total")
    assert [complete(server, p) for p in PROMPTS] == local_outputs["completions"]
    assert generate_grpc(server, GRPC_PROMPT) == local_outputs["grpc"]
    assert server.metric("tandem_remote_prefill_total") == remote_before + 3
    # Each prompt's blocks crossed from the prefill node's actor to a decode node's actor.
    assert server.metric("tandem_kv_transfer_bytes_total") > moved_before


def test_killed_decode_actor_comes_back_and_nothing_leaks(server):
    stream = Stream(server, max_tokens=STREAM_TOKENS)
    stream.start()
    wait_until(lambda: stream.num_chunks >= 3 or stream.done.is_set(), 60, "the stream started")
    assert stream.error is None and not stream.done.is_set()
    victim = running_decode_worker(server)
    num_registrations = len(registrations(server, victim))
    os.kill(ray.get(tandem_actors()[victim].pid.remote()), signal.SIGKILL)
    stream.join(180)  # migrated: the other decode worker recomputes the prefix, then decodes on
    assert not stream.is_alive(), "the request did not end after its worker was killed"
    # Either migrated to the other decode worker and finished, or a clear error.
    if stream.error is None:
        assert stream.finish == "length" and stream.num_chunks > 3
    else:
        assert isinstance(stream.error, openai.APIError) and str(stream.error)
    wait_until(lambda: len(registrations(server, victim)) > num_registrations, 90,
               f"{victim} registered again")
    assert any(f"restarting worker {victim}" in line for line in server.lines)
    assert complete(server, PROMPTS[1]) and generate_grpc(server, GRPC_PROMPT)
    wait_until(lambda: nothing_held(server), 15, "every worker idle with no block held")


def test_deployment_adds_and_removes_actors_while_serving(server, cluster):
    from tandem.engine.config import EngineConfig
    from tandem.launcher.ray_config import RayConfig
    from tandem.launcher.ray_deploy import RayDeployment
    from tandem.worker.auth import SECRET_ENV
    from tandem.worker.config import WorkerConfig, WorkerOptions

    control = re.search(r"control (\S+)", "".join(server.lines)).group(1)
    deployment = RayDeployment(RayConfig(address=cluster.address,
                                         decode_resources="decode_node=1"))
    engine = EngineConfig(model="random:tiny", role="decode", device="cpu", num_kv_blocks=64)
    deployment.start_worker(WorkerOptions("decode-9", "decode", control, engine, WorkerConfig(),
                                          internal_secret=os.environ[SECRET_ENV]))
    wait_until(lambda: registrations(server, "decode-9"), 60, "decode-9 registered")
    assert "decode-9" in tandem_actors()
    assert deployment.dead_workers() == []
    assert len(live_workers(server)) == 4
    num_groups = len(created_groups())
    deployment.stop_worker("decode-9", timeout_s=10)
    wait_until(lambda: "decode-9" not in tandem_actors(), 10, "decode-9's actor gone")
    wait_until(lambda: len(created_groups()) == num_groups - 1, 10, "decode-9's group removed")
    # It did not deregister: the frontend drops it when its connection breaks.
    wait_until(lambda: "decode-9" not in worker_states(server), 15, "decode-9 dropped")
    assert complete(server, PROMPTS[0])


# ---- helpers -------------------------------------------------------------------------------------

def created_groups() -> list[dict]:
    from ray.util import placement_group_table
    return [g for g in placement_group_table().values() if g["state"] == "CREATED"]


def start_serve(args: list[str], timeout_s: float = 150.0) -> Server:
    """`tandem serve` at INFO (its lines say where each worker registered)."""
    return start_server(*args, timeout_s=timeout_s, log_level="INFO")


def client_of(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0, timeout=60)


def complete(server: Server, prompt: str) -> str:
    out = client_of(server).completions.create(model="random:tiny", prompt=prompt,
                                               max_tokens=MAX_TOKENS, temperature=0)
    assert out.usage.completion_tokens == MAX_TOKENS
    return out.choices[0].text


def generate_grpc(server: Server, prompt: str) -> list[int]:
    with grpc.insecure_channel(server.grpc_address) as channel:
        request = pb.GenerateRequest(text=prompt, sampling=pb.SamplingOptions(
            max_tokens=MAX_TOKENS, temperature=0))
        responses = list(pbgrpc.GenerationStub(channel).Generate(request, timeout=60))
    assert responses[-1].finish_reason == "length"
    return [t for r in responses for t in r.token_ids]


class Stream(threading.Thread):
    """A streamed greedy completion in the background: chunks, finish reason or error."""

    def __init__(self, server: Server, max_tokens: int):
        super().__init__(daemon=True)
        self.client, self.max_tokens = client_of(server), max_tokens
        self.num_chunks, self.finish, self.error = 0, None, None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for chunk in self.client.completions.create(
                    model="random:tiny", prompt=PROMPTS[0], max_tokens=self.max_tokens,
                    temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if chunk.choices:
                    self.num_chunks += 1
                    self.finish = chunk.choices[0].finish_reason or self.finish
        except Exception as err:  # the test asserts on it
            self.error = err
        finally:
            self.done.set()


def tandem_actors() -> dict[str, object]:
    """Live tandem worker actors in the cluster, by worker id."""
    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "tandem" and "@" in entry["name"]:
            try:
                found[entry["name"].split("@")[0]] = ray.get_actor(entry["name"], "tandem")
            except ValueError:  # died between the listing and the lookup
                continue
    return found


def registrations(server: Server, worker_id: str) -> list[str]:
    """Addresses `worker_id` registered at, oldest first, from the frontend's log."""
    return [m.group(3) for line in server.lines if (m := REGISTERED.search(line))
            and m.group(1) == worker_id]


def live_workers(server: Server) -> dict[str, str]:
    """Each registered worker's latest address, for those answering GetStats."""
    return {w: a for w, a in ((w, registrations(server, w)[-1]) for w in worker_ids(server))
            if worker_stats(a) is not None}


def worker_ids(server: Server) -> set[str]:
    return {m.group(1) for line in server.lines if (m := REGISTERED.search(line))}


def worker_stats(address: str) -> wpb.WorkerStats | None:
    try:
        with grpc.insecure_channel(address) as channel:
            return wgrpc.WorkerStub(channel).GetStats(wpb.StatsRequest(), timeout=2,
                                                      metadata=internal_metadata())
    except grpc.RpcError:
        return None


def worker_states(server: Server) -> dict[str, float]:
    """Workers the frontend lists (id -> KV usage), from /metrics."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=5).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'vllm:kv_cache_usage_perc\{[^}]*worker="([^"]+)"[^}]*\} (\S+)', text)}


def running_decode_worker(server: Server) -> str:
    for worker_id, address in live_workers(server).items():
        stats = worker_stats(address)
        if worker_id.startswith("decode") and stats is not None and stats.num_running > 0:
            return worker_id
    raise AssertionError("no decode worker is running the request")


def nothing_held(server: Server) -> bool:
    """On every live worker: nothing running or pinned, every block free (GetStats)."""
    stats = [worker_stats(a) for a in live_workers(server).values()]
    return len(stats) == 3 and all(
        s.num_running == 0 and s.num_waiting == 0 and s.num_pinned_requests == 0
        and s.num_free_blocks == s.num_blocks for s in stats)


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout_s:.0f} s: {what}")
        time.sleep(0.2)
