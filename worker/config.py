"""A worker's configuration: the settings every worker of a deployment shares (`WorkerConfig`) and
the spec of one worker (`WorkerOptions`), which the launcher serializes and the worker process reads
back, so a worker is configured by the same validated dataclasses as the launcher, not by an argv
rebuilt and parsed again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from tandem.engine.config import EngineConfig

WORKER_ROLES = ("prefill", "decode")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    host: str = "127.0.0.1"          # where the Worker gRPC service binds and is reached
    lease_s: float = 30.0            # prefill: pinned blocks are freed after this even if never pulled
    transfer_timeout_s: float = 30.0  # decode: a pull slower than this falls back to recompute
    # A worker that cannot reach its frontend this long exits, so that a dead frontend leaves no
    # workers behind (a local worker also dies with its parent process at once). Long, because a
    # frontend that is only slow (a starved host answered heartbeats late; 10 s made prefill-0
    # exit in the 10,000-request soak, benchmarks/RESULTS.md) must not lose its workers.
    frontend_silence_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.lease_s > 0:
            raise ValueError(f"kv_lease_s must be > 0 seconds, got {self.lease_s}")
        if not self.frontend_silence_s > 0:
            raise ValueError(f"frontend_silence_s must be > 0 seconds, got "
                             f"{self.frontend_silence_s}")
        if not self.transfer_timeout_s > 0:
            raise ValueError(f"transfer_timeout_s must be > 0 seconds, got "
                             f"{self.transfer_timeout_s}")


@dataclass(slots=True)
class WorkerOptions:
    """One worker: who it is, where its frontend listens, its engine and the shared settings."""
    worker_id: str
    role: str                        # prefill | decode
    frontend: str                    # host:port of the frontend's Control service
    engine: EngineConfig = field(default_factory=EngineConfig)
    config: WorkerConfig = field(default_factory=WorkerConfig)
    port: int = 0                    # 0: any free port
    enable_kv_transfer: bool = True  # False in aggregated serving: nothing to pull
    cpu_threads: int | None = None   # torch threads on a CPU; None: torch's choice
    may_change_role: bool = False    # the planner may flip it: its NIXL agent then runs the
                                     # owner's progress thread whatever the role (launcher/worker.py)
    # The deployment's internal secret (worker/auth.py), carried by the spec and never on a command
    # line; "": the worker process's own TANDEM_INTERNAL_SECRET.
    internal_secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.role not in WORKER_ROLES:
            raise ValueError(f"worker role must be one of {WORKER_ROLES}, got {self.role!r}")
        if self.engine.role != self.role:
            raise ValueError(f"worker {self.worker_id} is a {self.role} worker but its engine is "
                             f"built for {self.engine.role!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {self.cpu_threads}")

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def lease_s(self) -> float:
        return self.config.lease_s

    @property
    def transfer_timeout_s(self) -> float:
        return self.config.transfer_timeout_s

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerOptions:
        data = json.loads(text)
        engine = EngineConfig(**data.pop("engine"))
        config = WorkerConfig(**data.pop("config"))
        return cls(engine=engine, config=config, **data)
