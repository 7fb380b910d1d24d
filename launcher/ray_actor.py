"""One tandem worker inside a Ray actor.

The actor's constructor starts the worker (`serve_worker`, the same code a local worker process
runs) on a thread with its own asyncio loop (signal handlers belong to Ray's main thread, so the
worker stops on `stop`, not on SIGTERM). Ray only places and supervises: requests reach the worker
over its gRPC port, KV blocks over NIXL.

A worker that fails (its engine raised, its frontend went silent) ends the actor's process, as a
local worker process exits, so that the deployment sees a death and tandem's supervisor starts a
fresh actor. The methods are for the deployment: `wait_stopped` returns when the worker stopped
on request (the deployment holds one call open per actor to learn of deaths), `stop` shuts the
worker down gracefully, `pid` and `node_id` say where it runs.

This module does not import Ray: `RayDeployment` wraps the class with `ray.remote` itself, so
that the local launcher never needs Ray.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from tandem.launcher.worker import configure_process, serve_worker
from tandem.worker.config import WorkerOptions

logger = logging.getLogger(__name__)

FAILED_EXIT_CODE = 1


class WorkerActor:
    def __init__(self, spec_json: str, log_level: str = "WARNING") -> None:
        logging.basicConfig(level=log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.options = WorkerOptions.from_json(spec_json)
        configure_process(self.options)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"worker-{self.options.worker_id}",
                                       daemon=True)
        self.thread.start()
        self.started.wait()

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    def wait_stopped(self) -> str:
        """Returns the worker id once the worker stopped on request; the actor dies otherwise."""
        self.thread.join()
        return self.options.worker_id

    def stop(self, timeout_s: float) -> bool:
        """Stop serving (gRPC grace period, engine, NIXL agent); True if done within timeout_s."""
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout_s)
        return not self.thread.is_alive()

    def _run(self) -> None:
        try:
            asyncio.run(_serve(self))
        except BaseException:
            logger.exception("worker %s failed; ending its actor", self.options.worker_id)
            logging.shutdown()
            os._exit(FAILED_EXIT_CODE)  # a thread's exception would otherwise leave a live actor



async def _serve(actor: WorkerActor) -> None:
    """Outside the class: Ray makes an actor with any coroutine method an async actor, whose
    methods would then share one event loop thread that `wait_stopped` blocks."""
    import ray  # only ever imported inside a Ray worker process

    actor.loop = asyncio.get_running_loop()
    actor.stop_event = asyncio.Event()
    actor.started.set()
    await serve_worker(actor.options, actor.stop_event, ray.util.get_node_ip_address())
