"""Both public APIs in this process, as `Frontend` wires them: the OpenAI HTTP app on uvicorn and the
gRPC Generation service, sharing one admission gate, one set of rules and one tokenizer thread, in
front of the fake pipeline of test_openai_api (a fixed reply, one token per chunk). Both servers run
on one event loop in a background thread, bound to 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import uvicorn

from tandem.frontend.admission import AdmissionConfig, AdmissionGate
from tandem.frontend.grpc_api import GenerationService, add_public_services, set_health
from tandem.frontend.openai_api import create_app, default_rules, tokenizer_thread
from tandem.frontend.request_rules import RequestLimits
from tests.frontend.test_openai_api import TOKENIZER, FakePipeline


class InProcessFrontend:
    def __init__(self, limits: RequestLimits = RequestLimits(),
                 admission: AdmissionConfig = AdmissionConfig()) -> None:
        self.pipeline = FakePipeline()
        self.gate = AdmissionGate(self.pipeline, admission)
        self.limits = limits
        self.rules = default_rules(self.gate, TOKENIZER, limits)
        self.executor = tokenizer_thread()
        self.app = create_app(self.gate, TOKENIZER, limits=limits, rules=self.rules,
                              tokenize_executor=self.executor)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.socket.getsockname()[1]
        self.grpc_address = ""
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),),
                                       daemon=True)

    async def _serve(self) -> None:
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.limits.max_request_bytes)])
        health = add_public_services(server, GenerationService(self.gate, TOKENIZER, self.rules,
                                                               self.executor))
        set_health(health, serving=True)
        self.grpc_address = "127.0.0.1:%d" % server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.ready.set()
        try:
            await self.uvicorn.serve(sockets=[self.socket])
        finally:
            await server.stop(0.5)

    def start(self) -> InProcessFrontend:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not (self.ready.is_set() and self.uvicorn.started):
            assert time.monotonic() < deadline, "the in-process frontend did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
