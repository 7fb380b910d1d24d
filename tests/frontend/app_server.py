"""An ASGI app served by uvicorn in a background thread on a free 127.0.0.1 port, for tests that
talk to the OpenAI API through real HTTP (the official `openai` client, httpx)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class AppServer:
    def __init__(self, app) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.socket.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]},
                                       daemon=True)

    def start(self, timeout_s: float = 10.0) -> AppServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=5)
        self.socket.close()
