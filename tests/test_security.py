"""Issue 13's security measures on a real `tandem serve` (1 prefill + 1 decode worker on a CPU):

- the internal APIs (the frontend's Control service, each worker's Worker service) refuse callers
  without the deployment's secret, or with a wrong one, while the deployment's own traffic (a
  remote prefill whose blocks move over NIXL) works;
- the public APIs want the API key (taken from TANDEM_API_KEY) and serve TLS with a self-signed
  certificate made here: HTTP through the official `openai` client, gRPC over a TLS channel;
  health and metrics stay open;
- every listener of the server and its workers is on loopback, and UCX is told so;
- a `tandem/` folder with a poisoned `__init__.py` in the server's working directory is never
  imported by the workers.

One server serves the whole module: starting it costs most of the module's time.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.api.v1 import generation_pb2 as pb
from tandem.api.v1 import generation_pb2_grpc as pbgrpc
from tandem.api.worker.v1 import worker_pb2 as wpb
from tandem.api.worker.v1 import worker_pb2_grpc as wgrpc
from tandem.contracts.wire import registration_to_proto
from tandem.contracts.worker_stats import Registration
from tandem.launcher.safe_start import python_module_command
from tandem.worker.auth import METADATA_KEY, SECRET_ENV
from tests.serving_harness import Server, free_port, registered_workers, wait_ready

pytest.importorskip("nixl")

API_KEY = "test-key-3f9c2a7e41b8d6"
PROMPT = ("In a quiet village by the sea, the fishermen mended their nets every morning while "
          "the children ran along the harbour wall, counting boats.")
MAX_TOKENS = 8
REFUSED = grpc.StatusCode.UNAUTHENTICATED


# ---- the server ----------------------------------------------------------------------------------

def make_certificate(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost: (certfile, keyfile)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(key, hashes.SHA256()))
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def poison(directory: Path) -> Path:
    """A `tandem/` package that leaves a mark and breaks its importer."""
    (directory / "tandem").mkdir()
    marker = directory / "poison-imported"
    (directory / "tandem" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\n"
        "raise SystemExit('the poisoned tandem package was imported')\n")
    return marker


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[str, str]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def cwd(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def marker(cwd) -> Path:
    return poison(cwd)


@pytest.fixture(scope="module")
def server(cwd, marker, tls):
    http_port, grpc_port = free_port(), free_port()
    certfile, keyfile = tls
    # The server itself is started without the working directory on its path too, as the
    # `tandem` console script is; what the test checks is how it starts its workers.
    command = python_module_command("tandem.launcher.cli", [
        "--log-level", "info", "serve", "--model", "random:tiny", "--device", "cpu",
        "--num-prefill", "1", "--num-decode", "1", "--num-kv-blocks", "64",
        "--remote-prefill-min-tokens", "16", "--http-port", str(http_port),
        "--grpc-port", str(grpc_port), "--ssl-certfile", certfile, "--ssl-keyfile", keyfile,
        "--drain-timeout-s", "5"])
    environ = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**environ, "PYTHONUNBUFFERED": "1",
                                               "TANDEM_API_KEY": API_KEY})
    server = Server(process, f"https://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    wait_ready(server)
    yield server
    code = server.stop()
    assert code == 0, "".join(server.lines[-40:])


# ---- helpers -------------------------------------------------------------------------------------

def worker_pids(server: Server) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server.process.pid)],
                         capture_output=True, text=True).stdout
    return [int(p) for p in re.findall(r"\d+", out)]


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(v.decode().split("=", 1) for v in f.read().split(b"\0") if b"=" in v)


def cmdline_of(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def internal_secret(server: Server) -> str:
    return environ_of(worker_pids(server)[0])[SECRET_ENV]


def worker_addresses(server: Server) -> dict[str, str]:
    """role -> the Worker service's address (one worker a role here)."""
    return dict(registered_workers(server).values())


def control_address(server: Server) -> str:
    return re.search(r"control (\S+)", "".join(server.lines)).group(1)


def code_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
            list(result)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def tls_channel(server: Server, tls: tuple[str, str]) -> grpc.Channel:
    with open(tls[0], "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(server.grpc_address, credentials)


def generate_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingOptions(
        max_tokens=MAX_TOKENS, temperature=0.0))


BAD_SECRETS = {"no secret": None, "a wrong secret": ((METADATA_KEY, "x" * 43),)}


# ---- internal APIs -------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata", BAD_SECRETS.values(), ids=BAD_SECRETS.keys())
def test_a_worker_registering_without_the_secret_is_refused(server, metadata):
    fake = registration_to_proto(Registration("decode-fake", "decode", "127.0.0.1:9", 16,
                                              "random:tiny", 64))
    secret = ((METADATA_KEY, internal_secret(server)),)
    with grpc.insecure_channel(control_address(server)) as channel:
        control = wgrpc.ControlStub(channel)
        assert code_of(lambda: control.Register(fake, metadata=metadata, timeout=5)) == REFUSED
        assert code_of(lambda: control.Deregister(wpb.DeregisterRequest(worker_id="decode-0"),
                                                  metadata=metadata, timeout=5)) == REFUSED
        # The frontend does not know the fake worker, and still knows the real one.
        assert not control.Heartbeat(wpb.HeartbeatRequest(worker_id="decode-fake"),
                                     metadata=secret, timeout=5).known
        assert control.Heartbeat(wpb.HeartbeatRequest(worker_id="decode-0"),
                                 metadata=secret, timeout=5).known


@pytest.mark.parametrize("metadata", BAD_SECRETS.values(), ids=BAD_SECRETS.keys())
def test_direct_worker_calls_without_the_secret_are_refused(server, metadata):
    addresses = worker_addresses(server)
    assert set(addresses) == {"prefill", "decode"}
    for role, address in addresses.items():
        with grpc.insecure_channel(address) as channel:
            worker = wgrpc.WorkerStub(channel)
            calls = {
                "Generate": lambda: worker.Generate(wpb.WorkerGenerateRequest(), timeout=5,
                                                    metadata=metadata),
                "Prefill": lambda: worker.Prefill(wpb.PrefillRequest(), timeout=5,
                                                  metadata=metadata),
                "Release": lambda: worker.Release(wpb.ReleaseRequest(request_id="r"), timeout=5,
                                                  metadata=metadata),
                "GetTransferInfo": lambda: worker.GetTransferInfo(wpb.TransferInfoRequest(),
                                                                  timeout=5, metadata=metadata),
                "ExpectPull": lambda: worker.ExpectPull(wpb.ExpectPullRequest(), timeout=5,
                                                        metadata=metadata),
                "GetStats": lambda: worker.GetStats(wpb.StatsRequest(), timeout=5,
                                                    metadata=metadata),
            }
            assert {name: code_of(call) for name, call in calls.items()} == \
                {name: REFUSED for name in calls}, role
            secret = ((METADATA_KEY, internal_secret(server)),)
            assert worker.GetStats(wpb.StatsRequest(), metadata=secret, timeout=5).num_blocks > 0
    deadline = time.monotonic() + 5  # each refusal is logged, by the worker that refused it
    while not any("refused internal call /tandem.worker" in line for line in server.lines):
        assert time.monotonic() < deadline, "no refusal was logged"
        time.sleep(0.1)


def test_the_secret_travels_in_the_environment_not_the_command_line(server):
    secret = internal_secret(server)
    assert len(secret) >= 43
    for pid in [server.process.pid, *worker_pids(server)]:
        assert secret not in cmdline_of(pid)
        assert API_KEY not in cmdline_of(pid)
    assert all(environ_of(pid)[SECRET_ENV] == secret for pid in worker_pids(server))


# ---- public APIs ---------------------------------------------------------------------------------

def test_http_wants_the_api_key_and_serves_tls(server, tls):
    certfile = tls[0]
    url = f"{server.http_url}/v1/completions"
    body = {"model": "random:tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS}
    with httpx.Client(verify=ssl_context(certfile), timeout=30) as http:
        missing = http.post(url, json=body)
        wrong = http.post(url, json=body, headers={"Authorization": "Bearer not-the-key"})
        assert (missing.status_code, wrong.status_code) == (401, 401)
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert http.get(f"{server.http_url}/v1/models").status_code == 401
        # Health and metrics stay open: load balancers and Prometheus hold no key.
        assert http.get(f"{server.http_url}/health").status_code == 200
        assert "vllm:num_requests_running" in http.get(f"{server.http_url}/metrics").text
    with pytest.raises(httpx.TransportError):  # TLS only: a plain-text client gets nothing
        httpx.get(server.http_url.replace("https://", "http://") + "/health", timeout=5)

    def client(api_key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=api_key, max_retries=0,
                             http_client=httpx.Client(verify=ssl_context(certfile), timeout=60))

    with client("not-the-key") as wrong_client, pytest.raises(openai.AuthenticationError):
        wrong_client.completions.create(**body)
    remote_before = remote_prefills(server, certfile)
    with client(API_KEY) as right_client:
        out = right_client.completions.create(**body, temperature=0)
    assert out.usage.completion_tokens == MAX_TOKENS and out.choices[0].text
    # Real traffic between the processes worked: prefilled on the prefill worker, blocks pulled.
    assert remote_prefills(server, certfile) == remote_before + 1


def ssl_context(certfile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certfile)


def remote_prefills(server: Server, certfile: str) -> float:
    text = httpx.get(f"{server.http_url}/metrics", verify=ssl_context(certfile), timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tandem_remote_prefill_total"))


def test_grpc_wants_the_api_key_over_tls(server, tls):
    with tls_channel(server, tls) as channel:
        stub = pbgrpc.GenerationStub(channel)
        wrong = (("authorization", "Bearer not-the-key"),)
        right = (("authorization", f"Bearer {API_KEY}"),)
        assert code_of(lambda: stub.Generate(generate_request(), timeout=30)) == REFUSED
        assert code_of(lambda: stub.Generate(generate_request(), timeout=30,
                                             metadata=wrong)) == REFUSED
        tokens = [t for r in stub.Generate(generate_request(), timeout=60, metadata=right)
                  for t in r.token_ids]
        assert len(tokens) == MAX_TOKENS
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.grpc_address) as plain:  # TLS only
        assert code_of(lambda: pbgrpc.GenerationStub(plain).Generate(
            generate_request(), timeout=5, metadata=right)) == grpc.StatusCode.UNAVAILABLE


# ---- listeners and the import path ---------------------------------------------------------------

def listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets `pid` listens on (IPv4 and IPv6), from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    addresses.append(decode_address(fields[1]))
    return addresses


def decode_address(hex_address: str) -> str:
    """/proc/net/tcp's "0100007F:1F90" (little-endian words) to "127.0.0.1:8080"."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"{ip}:{int(port, 16)}"


def test_every_listener_is_on_loopback(server):
    pids = [server.process.pid, *worker_pids(server)]
    assert len(pids) == 3
    listeners = {pid: listening_addresses(pid) for pid in pids}
    # Server: HTTP, public gRPC, control. Workers: gRPC and UCX's listener at least.
    assert [len(listeners[pid]) >= (3 if pid == server.process.pid else 2) for pid in pids] == \
        [True] * 3, listeners
    for pid, addresses in listeners.items():
        for address in addresses:
            assert ipaddress.ip_address(address.rsplit(":", 1)[0]).is_loopback, (pid, address)


def test_workers_do_not_import_a_tandem_folder_in_the_working_directory(server, cwd, marker):
    assert all(Path(os.readlink(f"/proc/{pid}/cwd")) == cwd for pid in worker_pids(server))
    assert not marker.exists()


def test_the_module_command_keeps_the_working_directory_off_the_import_path(tmp_path):
    marker = poison(tmp_path)
    module = "tandem.contracts.block_hash"  # imports the tandem package, cheaply
    versions = [(3, 10)] + ([(3, 11)] if sys.version_info >= (3, 11) else [])
    for version in versions:  # the -c bootstrap (3.10) and -P (3.11+), both on this Python
        subprocess.run(python_module_command(module, [], version=version), cwd=tmp_path,
                       check=True, capture_output=True)
    assert not marker.exists()
    naive = subprocess.run([sys.executable, "-m", module], cwd=tmp_path, capture_output=True)
    assert naive.returncode != 0 and marker.exists()  # what workers started with -m ran into
