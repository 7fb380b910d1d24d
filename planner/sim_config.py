"""What a simulated deployment is made of: its shape, each worker's engine knobs, the router's
policy, and the frontend's own latencies.

Every default comes from the real component's config dataclass: the engine's limits from
`EngineConfig`, the routing policy from `RoutingConfig` / `KVPolicyConfig`. What a profile knows
about the device (KV cache size, context length) comes from the profile's recorded engine settings
(`profile["engine"]`), and flags may override it. Nothing here is a second copy of a default that
lives elsewhere, with one exception named at its field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tandem.engine.config import EngineConfig
from tandem.router.routing import RoutingConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SimConfig:
    num_prefill: int                    # 0: aggregated (decode workers prefill locally)
    num_decode: int
    num_kv_blocks: int                  # per worker
    max_model_len: int
    engine: EngineConfig = field(default_factory=EngineConfig)  # block size, step budget, seqs
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    # The frontend's heartbeat period (FrontendConfig.heartbeat_interval_s, which lives a floor
    # above the planner and so cannot be imported): how often workers' block counts correct the
    # router's load books.
    heartbeat_interval_s: float = 0.5
    kv_event_delay_s: float = 0.0       # worker -> router KV event latency; 0: applied at once
    frontend_overhead_s: float = 0.0    # tokenize, hash, route: before a request reaches a worker
    rpc_s: float = 0.0                  # one gRPC hop (frontend <-> worker), each direction
    # What a serving worker adds to the engine step a profile measures: host work per step (the
    # worker's loop, its gRPC server), and per token a decode-only step streams back (one message
    # per request per step through the worker and the frontend; a step with a prompt chunk pays
    # per prompt token instead, below). 0: the profile's step alone.
    step_overhead_s: float = 0.0
    token_overhead_s: float = 0.0
    # Host work of a step that carries a prompt chunk, beyond the profile's step: per prompt token
    # it carries, and per such step scheduled after the hand-back of the step before it (not
    # queued early, `prompt_launch_s` below) where the engine waited for that step (it sampled;
    # a prompt's chunk before its last is not waited for): the loop's token relay and the
    # operations it applies come first, with the device idle.
    chunk_overhead_s: float = 0.0
    prefill_token_overhead_s: float = 0.0
    # Per prompt past the first in a step (a prompt's last chunk beside the next one's first, a
    # burst of short prompts): the profile times one prompt a step, and each further one adds its
    # own host and kernel work (benchmarks/RESULTS.md, "prompts a step").
    extra_prompt_overhead_s: float = 0.0
    # The frontend's time per streamed token, shared by every worker: one server that every token
    # passes through on its way to the client, taking the streams in turn (planner/sim_frontend.py).
    # 0: no such ceiling.
    frontend_s_per_token: float = 0.0
    # Serving up to commit e65eadc: a prefill worker answered a finished prompt only at
    # its next step boundary (it read the pinned blocks through an engine operation). When it went
    # straight on to a chunk that does not sample, that boundary came once the chunk was launched,
    # not run: `chunk_launch_s` after the chunk starts. Off: the answer leaves as the step ends,
    # as prefill_workers/service.py answers now. On, to replay runs of the older serving path.
    answer_at_step_boundary: bool = False
    chunk_launch_s: float = 0.0
    # A serving worker with prompt tokens left to compute after a step that decoded queues its
    # next step before it hands back this step's tokens (LLMEngine.steps), so they leave once
    # that step is launched: `prompt_launch_s` after the step's end (a step log's `host_s` of
    # steps with prompt tokens). 0: they leave as the step ends.
    prompt_launch_s: float = 0.0
    # And so the operations that arrived during that step take effect a step later (False: the
    # serving path before 022ce11, which scheduled every such step after applying them).
    queue_prompts_early: bool = True
    # A serving worker queues a steady decode batch's next step before it applies the operations
    # that arrived during this one (engine/lookahead.py), so they take effect a step later.
    decode_lookahead: bool = True
    # Where the router's KV indexes run: in a helper process (planner/sim_index_process.py), which
    # gives the same answers and takes their work off the event loop's core; or in this one.
    kv_index_process: bool = False
    token_vocab_size: int = 2000        # synthetic output token ids are drawn below this
    # Run a stretch of identical decode steps as one event (planner/sim_worker.py says when that
    # is exact and what it delays); False: one event per step.
    collapse_decode_steps: bool = True
    # Keep every step's shape and simulated times, as a serving worker's step log has them
    # (engine/step_log.py), in SimWorker.step_log: `tandem simulate --step-log DIR`.
    record_steps: bool = False

    def __post_init__(self) -> None:
        if self.num_decode < 1:
            raise ValueError(f"num_decode must be at least 1, got {self.num_decode}")
        if self.num_prefill < 0:
            raise ValueError(f"num_prefill must be 0 or more, got {self.num_prefill}")
        if self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be positive, got "
                             f"{self.heartbeat_interval_s}")
        for name in ("kv_event_delay_s", "frontend_overhead_s", "rpc_s", "step_overhead_s",
                     "token_overhead_s", "chunk_overhead_s", "prefill_token_overhead_s",
                     "frontend_s_per_token", "chunk_launch_s", "prompt_launch_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.token_vocab_size <= 16:
            raise ValueError(f"token_vocab_size must exceed 16, got {self.token_vocab_size}")

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    @property
    def num_workers(self) -> int:
        return self.num_prefill + self.num_decode


def sim_config_from_profile(profile: dict, num_prefill: int, num_decode: int,
                            num_kv_blocks: int | None = None, max_model_len: int | None = None,
                            engine_overrides: dict | None = None,
                            routing: RoutingConfig | None = None, **timing) -> SimConfig:
    """A SimConfig whose device facts come from the profile, with explicit overrides on top.

    `engine_overrides` holds EngineConfig fields (max_num_batched_tokens, max_num_seqs, ...);
    `timing` holds SimConfig's latency fields (heartbeat_interval_s, rpc_s, ...).
    """
    recorded = profile.get("engine") or {}
    block_size = int(profile.get("block_size") or recorded.get("block_size")
                     or EngineConfig().block_size)
    engine = EngineConfig(block_size=block_size, **(engine_overrides or {}))
    if num_kv_blocks is None:
        num_kv_blocks = recorded.get("resolved_num_kv_blocks") or recorded.get("num_kv_blocks")
    if num_kv_blocks is None:
        raise ValueError("the profile records no KV cache size (engine.resolved_num_kv_blocks); "
                         "give --num-kv-blocks")
    if max_model_len is None:
        max_model_len = recorded.get("resolved_max_model_len") or recorded.get("max_model_len")
    if max_model_len is None:
        raise ValueError("the profile records no context length "
                         "(engine.resolved_max_model_len); give --max-model-len")
    return SimConfig(num_prefill=num_prefill, num_decode=num_decode,
                     num_kv_blocks=int(num_kv_blocks), max_model_len=int(max_model_len),
                     engine=engine, routing=routing or RoutingConfig(), **timing)
