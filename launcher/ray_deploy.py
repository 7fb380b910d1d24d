"""RayDeployment: tandem's workers as Ray actors on a cluster, behind the `Deployment` interface.

`tandem serve --launcher ray [--ray-address ADDRESS]` keeps the frontend in the driver process
(on the head node, or wherever it runs) and starts each worker as a `WorkerActor`
(launcher/ray_actor.py): one GPU each on GPU nodes (`num_gpus=1`, Ray sets CUDA_VISIBLE_DEVICES),
`--ray-cpus-per-worker` CPUs each on CPU nodes, placed on the nodes that offer the pool's custom
resources or labels (`--prefill-resources`, `--decode-resources`). Each worker's resources are
reserved first as a placement group of one bundle (STRICT_PACK: a worker with more than one GPU
would get them on one node), and the actor is scheduled into it; the group is removed with the
worker. Workers placed by node labels are scheduled by label selector without a group. Ray places
and supervises;
requests and KV blocks go worker to worker over gRPC and NIXL, never through Ray.

Supervision is tandem's own, the same as for local processes (launcher/supervisor.py, with its
backoff): Ray does not restart actors (max_restarts=0). The deployment holds one `wait_stopped`
call open per actor; when it fails, the actor died (a crash, SIGKILL, the OOM killer, a lost
node), and `dead_workers()` reports that worker until `stop_worker` forgets it; the serve loop's
supervisor then starts a fresh actor from the same spec, which Ray places on any node that fits.

Ray is imported only here and only when this deployment is made: GPU hosts without Ray keep the
local launcher.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any

from tandem.launcher.addresses import LOOPBACK, is_wildcard
from tandem.launcher.ray_config import RayConfig
from tandem.worker.config import WorkerOptions

logger = logging.getLogger(__name__)

NAMESPACE = "tandem"
ACTOR_MAX_CONCURRENCY = 4  # wait_stopped stays open; stop and pid must still get a thread
DEAD_ACTOR_EXIT_CODE = 1


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError("--launcher ray needs Ray: `pip install 'ray>=2.40'` (or "
                         "`pip install -e '.[ray]'`); the local launcher needs nothing more"
                         ) from None
    return ray


@dataclass(slots=True)
class _Actor:
    handle: Any
    spec: WorkerOptions
    watch: Any                    # ObjectRef of the open wait_stopped call
    exit_code: int | None = None  # set once the actor is known to be dead
    placement_group: Any = None   # the worker's reserved bundle, removed with it


class RayDeployment:
    def __init__(self, config: RayConfig, internal_host: str = LOOPBACK,
                 log_level: str = "WARNING", num_workers: int = 0):
        """`num_workers`: how many workers a Ray started here must fit (`_local_num_cpus`)."""
        self.config = config
        self.log_level = log_level
        self.ray = import_ray()
        self._init_ray(internal_host, num_workers)
        self.node_ip = self.ray.util.get_node_ip_address()
        self.actor_class = self.ray.remote(_actor_class())
        self.actors: dict[str, _Actor] = {}

    def _init_ray(self, internal_host: str, num_workers: int) -> None:
        if self.ray.is_initialized():
            return
        started = time.monotonic()
        # Loopback-only unless told otherwise: a Ray started here listens on 127.0.0.1.
        node_ip = LOOPBACK if internal_host == LOOPBACK else None
        options: dict[str, Any] = {}
        if self.config.address in (None, "local"):
            options = {"include_dashboard": False, "num_cpus": self._local_num_cpus(num_workers)}
        elif internal_host == LOOPBACK:
            logger.warning("joining Ray at %s with --internal-host %s: workers on other nodes "
                           "cannot reach this frontend; use --internal-host 0.0.0.0 for a cluster",
                           self.config.address, internal_host)
        self.ray.init(address=self.config.address, namespace=NAMESPACE, _node_ip_address=node_ip,
                      configure_logging=False, **options)
        logger.info("Ray ready in %.1f s: %s", time.monotonic() - started,
                    self.ray.cluster_resources())

    def _local_num_cpus(self, num_workers: int) -> int:
        """CPUs a Ray started on this machine offers: its cores, or enough for twice the workers
        (room for the planner to add some), as the local launcher also shares cores between
        workers rather than refusing to start them."""
        needed = 2 * num_workers * self.config.num_cpus_per_worker
        return max(os.cpu_count() or 1, math.ceil(needed))

    def resolve_device(self, device: str) -> str:
        """A device for every worker: `auto` is cuda when the cluster has GPUs (not this host)."""
        if device == "auto":
            return "cuda" if self.ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
        return device

    # ---- Deployment ------------------------------------------------------------------------------

    def start_worker(self, spec: WorkerOptions) -> None:
        spec = self._for_ray(spec)
        options = self._actor_options(spec)
        group = self._reserve(options)
        handle = self.actor_class.options(**options).remote(spec.to_json(), self.log_level)
        self.actors[spec.worker_id] = _Actor(handle, spec, handle.wait_stopped.remote(),
                                             placement_group=group)
        logger.info("starting %s worker %s as a Ray actor (%s)", spec.role, spec.worker_id,
                    {k: v for k, v in options.items() if k != "name"})

    def stop_worker(self, worker_id: str, timeout_s: float) -> None:
        actor = self.actors.pop(worker_id, None)
        if actor is not None:
            self._stop([actor], timeout_s)

    def dead_workers(self) -> list[str]:
        """Workers whose actor died (or whose worker stopped unasked), until stop_worker."""
        return sorted(w for w, a in self.actors.items() if self._is_dead(a))

    def exit_code(self, worker_id: str) -> int | None:
        """1 for a dead actor (Ray does not say how its process ended: the reason is logged);
        None while it runs or when unknown."""
        actor = self.actors.get(worker_id)
        return None if actor is None else actor.exit_code

    def stop_all(self, timeout_s: float) -> None:
        actors = list(self.actors.values())
        self.actors.clear()
        self._stop(actors, timeout_s)

    # ---- helpers ---------------------------------------------------------------------------------

    def _for_ray(self, spec: WorkerOptions) -> WorkerOptions:
        """Ray picks the GPU (CUDA_VISIBLE_DEVICES), so the worker asks for plain `cuda`; a CPU
        worker takes as many torch threads as CPUs it asked for; the frontend's address must be
        one the actor's node can reach."""
        device = "cuda" if spec.engine.device.startswith("cuda") else spec.engine.device
        cpu_threads = None if device == "cuda" else max(1, int(self.config.num_cpus_per_worker))
        host, _, port = spec.frontend.rpartition(":")
        frontend = f"{self.node_ip}:{port}" if is_wildcard(host) else spec.frontend
        return replace(spec, engine=replace(spec.engine, device=device), frontend=frontend,
                       cpu_threads=cpu_threads)

    def _actor_options(self, spec: WorkerOptions) -> dict[str, Any]:
        placement = self.config.placement(spec.role)
        options: dict[str, Any] = {
            "name": f"{spec.worker_id}@{id(self):x}-{time.monotonic_ns():x}",
            "num_cpus": self.config.num_cpus_per_worker,
            "num_gpus": 1 if spec.engine.device == "cuda" else 0,
            "max_restarts": 0,      # tandem's supervisor restarts workers, with its backoff
            "max_task_retries": 0,  # a call in flight when the actor dies fails: that is the signal
            "max_concurrency": ACTOR_MAX_CONCURRENCY,
        }
        if placement.resources:
            options["resources"] = dict(placement.resources)
        if placement.labels:
            options["label_selector"] = dict(placement.labels)
        return options

    def _reserve(self, options: dict[str, Any]) -> Any:
        """A placement group of one bundle holding what the actor asks for, with the actor
        scheduled into it (in `options`); None for label-placed workers. Does not block: the
        actor starts once the group is placed."""
        if "label_selector" in options:
            return None
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": options["num_cpus"], **options.get("resources", {})}
        if options["num_gpus"]:
            bundle["GPU"] = options["num_gpus"]
        group = placement_group([bundle], strategy="STRICT_PACK")
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0)
        return group

    def _is_dead(self, actor: _Actor) -> bool:
        if actor.exit_code is not None:
            return True
        ready, _ = self.ray.wait([actor.watch], timeout=0)
        if not ready:
            return False
        try:
            self.ray.get(ready[0])
            logger.error("worker %s stopped although no one asked it to", actor.spec.worker_id)
        except self.ray.exceptions.RayActorError as err:
            reason = str(err).strip().splitlines()
            logger.error("worker %s: its Ray actor died: %s", actor.spec.worker_id,
                         " ".join(reason[:3])[:500])
        actor.exit_code = DEAD_ACTOR_EXIT_CODE
        return True

    def _stop(self, actors: list[_Actor], timeout_s: float) -> None:
        """Ask each live worker to stop, wait up to timeout_s for all, then end the actors."""
        calls = [a.handle.stop.remote(timeout_s) for a in actors if a.exit_code is None]
        if calls and timeout_s > 0:
            self.ray.wait(calls, num_returns=len(calls), timeout=timeout_s + 1.0)
        for actor in actors:
            self.ray.kill(actor.handle, no_restart=True)
            if actor.placement_group is not None:
                from ray.util.placement_group import remove_placement_group
                remove_placement_group(actor.placement_group)


def _actor_class() -> type:
    from tandem.launcher.ray_actor import WorkerActor
    return WorkerActor
