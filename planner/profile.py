"""`tandem profile`: measure a model's step times on this device into a profile file.

The profile is what the performance model (planner/perf_model.py) is fitted from, and so what the
simulator and `tandem plan` believe about time. It holds raw measured points, one list per step
kind, with the inputs of each step and its median wall time in seconds:

- prefill: a prompt's last chunk of `num_new_tokens` after `num_cached_tokens` already in KV;
- decode: `batch_size` sequences one token each, `num_context_tokens` summed over the batch,
  through the CUDA graphs serving replays;
- mixed: a prefill chunk scheduled after a decode batch in one step, as chunked prefill runs them;
- transfer: bytes of consecutive KV blocks copied to a second device (planner/profile_transfer.py).

The grids reach the context length (prefill), the KV memory limit and 256 sequences (decode), and
the engine's step token budget. A grid point that does not fit this engine is skipped, not clipped,
so every point is a shape serving can run. The engine is built as serving builds it (role `both`,
memory-sized KV cache, CUDA graphs on a GPU); the settings used are recorded beside the points.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import logging
import os
import platform
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine, resolve_device, resolve_dtype
from tandem.engine.model_info import describe_model
from tandem.planner.profile_grid import ProfileGrid, default_grid, plan_points
from tandem.planner.profile_points import StepProbe
from tandem.planner.profile_sweep import sweep_decode, sweep_mixed, sweep_prefill
from tandem.planner.profile_transfer import measure_transfer, peer_device

logger = logging.getLogger(__name__)

SCHEMA = "tandem.profile/1"


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    model: str = "random:tiny"
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None    # None: the model's, as `tandem serve` defaults to
    block_size: int = 16
    num_kv_blocks: int | None = None    # None: sized from memory, as serving sizes it
    max_num_seqs: int = 256
    transfer_peer: str = "auto"         # auto: the other of two GPUs; none; or a device name
    quick: bool = False                 # a few points per kind: for tests and smoke runs
    # Mixed points as a series of a long prompt's chunks run through LLMEngine.steps(), as
    # serving runs them (StepProbe.mixed_series), instead of one step timed alone.
    mixed_as_served: bool = False
    seed: int = 0


_DECODE_TIMING = ("decode: interval between consecutive steps' tokens of one placed batch run "
                  "through LLMEngine.steps() (each step queued before the previous one's tokens "
                  "are read, as serving runs them), median after warm-up steps")
_TIMING = ("garbage collector paused; prefill and mixed: wall time of LLMEngine.step() between "
           "device synchronizations, median over interleaved passes of the grid in random order "
           "after a warm-up pass; " + _DECODE_TIMING)
_TIMING_AS_SERVED = ("garbage collector paused; prefill: wall time of LLMEngine.step() between "
                     "device synchronizations, median over interleaved passes of the grid in "
                     "random order after a warm-up pass; mixed: in the same passes, each point a "
                     "series of a long prompt's chunks beside its decode batch run through "
                     "LLMEngine.steps(), the interval between consecutive steps' tokens but the "
                     "first and the last, the cached prefix and decode context their steps' "
                     "mean; " + _DECODE_TIMING)


def run_profile(settings: ProfileSettings, progress: bool = True) -> dict:
    """Measure every point of the grid on settings.device; returns the profile (a JSON dict)."""
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    info = describe_model(settings.model, settings.max_model_len)
    grid = default_grid(device.type, settings.quick)
    kv_bytes_per_token = info.config.kv_elements_per_token * dtype.itemsize
    # Before the engine takes the GPU's memory: the copy needs two large buffers.
    transfer = _transfer(device, settings, kv_bytes_per_token * settings.block_size, grid)
    engine = LLMEngine(EngineConfig(
        model=settings.model, role="both", device=settings.device, dtype=settings.dtype,
        seed=settings.seed, block_size=settings.block_size, num_kv_blocks=settings.num_kv_blocks,
        max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=grid.max_step_tokens,
        max_model_len=settings.max_model_len))
    probe = StepProbe(engine, settings.seed)
    probe.warm_up(min(grid.max_step_tokens, 1024))
    points = plan_points(grid, engine.num_blocks, settings.block_size, engine.max_model_len,
                         settings.max_num_seqs)
    bar = tqdm(total=_num_visits(grid, points), desc=f"profile {settings.model}", unit="step",
               disable=not progress)
    rng = random.Random(settings.seed)
    results: dict[str, list[dict]] = {}
    measure_s = {}
    for kind in ("decode", "prefill", "mixed"):
        kind_start = time.perf_counter()
        bar.set_postfix_str(kind)
        args = [a for k, a in points if k == kind]
        if kind == "decode":
            results[kind] = sweep_decode(probe, args, grid.repeats[kind], bar.update)
        elif kind == "prefill":
            results[kind] = sweep_prefill(probe, args, grid.repeats[kind], rng, bar.update)
        else:
            results[kind] = sweep_mixed(probe, args, grid.repeats[kind], rng, bar.update,
                                        settings.mixed_as_served)
        measure_s[kind] = time.perf_counter() - kind_start
    bar.close()
    setup_s = time.perf_counter() - start - sum(measure_s.values())
    profile = {
        "schema": SCHEMA,
        "model": settings.model,
        "device": str(device),
        "device_name": device_name(device),
        "tandem_version": _version(),
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "block_size": settings.block_size,
        "kv_bytes_per_token": kv_bytes_per_token,
        "engine": _engine_settings(engine),
        "grid": dataclasses.asdict(grid),
        "timing": _TIMING_AS_SERVED if settings.mixed_as_served else _TIMING,
        "prefill": results["prefill"], "decode": results["decode"], "mixed": results["mixed"],
        "transfer": transfer,
    }
    profile["wall_s"] = round(time.perf_counter() - start, 2)
    # other processes on the host compete for the cores that launch the kernels: say how many
    profile["host_load_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    profile["host_num_cpus"] = os.cpu_count()
    # a small model's eager steps are bound by the host's launches: the same GPU behind another
    # CPU measured its prompt steps 5-10% apart (benchmarks/RESULTS.md)
    profile["host_cpu"] = host_cpu_name()
    # where the wall time went: transfer and engine start-up, then each kind's points
    profile["phase_s"] = {"setup": round(setup_s, 2),
                          **{kind: round(s, 2) for kind, s in measure_s.items()}}
    del probe, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return profile


def _num_visits(grid: ProfileGrid, points: list[tuple[str, tuple]]) -> int:
    """Progress bar length: decode points, and prefill and mixed points times their passes."""
    counts = {kind: sum(1 for k, _ in points if k == kind) for kind in grid.repeats}
    return counts["decode"] + sum(counts[kind] * grid.repeats[kind].max_steps
                                  for kind in ("prefill", "mixed"))


def _transfer(device: torch.device, settings: ProfileSettings, block_bytes: int,
              grid: ProfileGrid) -> dict:
    peer = peer_device(device, settings.transfer_peer)
    if device.type == "cuda" and peer is None:
        return {"method": None, "points": [],
                "note": "one device: no transfer between workers was measured"}
    return measure_transfer(device, peer, block_bytes, grid.transfer_max_blocks)


def _engine_settings(engine: LLMEngine) -> dict:
    settings = dataclasses.asdict(engine.config)
    settings.update(resolved_device=str(engine.device), resolved_dtype=str(engine.dtype),
                    resolved_num_kv_blocks=engine.num_blocks,
                    resolved_max_model_len=engine.max_model_len,
                    cuda_graphs=engine.runner.graphs is not None, sampling="greedy",
                    # steps up to this many tokens ran as their bucket's (engine/step_buckets.py)
                    step_graph_max_tokens=(engine.runner.step_graphs.max_tokens
                                           if engine.runner.step_graphs is not None else None),
                    # decode steps ran as the next captured batch size up to this one
                    decode_graph_max_batch=(max(engine.runner.graphs.sizes)
                                            if engine.runner.graphs is not None else None))
    return settings


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores)"


def host_cpu_name() -> str | None:
    """The host CPU's model name (Linux), None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _version() -> str:
    try:
        return importlib.metadata.version("tandem")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
