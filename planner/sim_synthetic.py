"""A synthetic profile from a roofline, for tests and for timing the simulator itself.

Not a measurement: step times are max(weight + KV bytes over memory bandwidth, FLOPs over matmul
rate) plus a fixed launch overhead, on the grid `tandem profile` measures. It lets the simulator
and `tandem plan` run (and be timed) where no measured profile of the model exists yet; capacity
answers must come from a measured profile (planner/profiles/).

The default numbers describe Llama-3.1-8B in bf16 on one H200: 16 GB of weights, 128 KiB of KV
per token, 4.2 TB/s (DESIGN.md: measured device copy), 700 TFLOP/s (measured bf16 matmul), a
transfer of 150 GB/s after 1 ms (DESIGN.md: NIXL pulls reach 80-97% of the 183-395 GB/s paths).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Roofline:
    weight_bytes: float = 16.1e9
    flops_per_token: float = 2 * 8.0e9
    attention_flops_per_token_pair: float = 4 * 4096 * 32  # q.k and p.v over 32 layers of 4096
    kv_bytes_per_token: int = 131072
    memory_bytes_per_s: float = 4.2e12
    flops_per_s: float = 700e12
    matmul_efficiency: float = 0.6
    overhead_s: float = 1.5e-3
    transfer_latency_s: float = 1e-3
    transfer_bytes_per_s: float = 150e9

    def prefill_s(self, num_new: int, num_cached: int) -> float:
        flops = (self.flops_per_token * num_new
                 + self.attention_flops_per_token_pair * num_new * (num_cached + num_new / 2))
        compute_s = flops / (self.flops_per_s * self.matmul_efficiency)
        memory_s = (self.weight_bytes + self.kv_bytes_per_token * (num_cached + num_new)) \
            / self.memory_bytes_per_s
        return self.overhead_s + max(compute_s, memory_s)

    def decode_s(self, batch_size: int, num_context: int) -> float:
        memory_s = (self.weight_bytes + self.kv_bytes_per_token * num_context) \
            / self.memory_bytes_per_s
        compute_s = self.flops_per_token * batch_size / (self.flops_per_s * self.matmul_efficiency)
        return self.overhead_s + max(memory_s, compute_s)


@dataclass(frozen=True, slots=True)
class LinearSteps:
    """Step times linear in tokens and sequences, in `Roofline`'s shape: for runs of the planner
    over random:tiny workers on a CPU (tests, planner_flip_bench.py), where a light load must ask
    for more than one worker per pool."""
    overhead_s: float = 0.01
    prefill_s_per_token: float = 3e-3
    decode_s_per_seq: float = 23.4e-3
    weight_bytes: float = 0.0
    memory_bytes_per_s: float = 1e12
    kv_bytes_per_token: int = 2048
    transfer_latency_s: float = 1e-3
    transfer_bytes_per_s: float = 1e9

    def prefill_s(self, num_new: int, num_cached: int) -> float:
        return self.overhead_s + self.prefill_s_per_token * num_new

    def decode_s(self, batch_size: int, num_context: int) -> float:
        return self.overhead_s + self.decode_s_per_seq * batch_size


def synthetic_profile(roofline: Roofline | LinearSteps = Roofline(), block_size: int = 16,
                      num_kv_blocks: int = 30000, max_model_len: int = 131072,
                      max_num_batched_tokens: int = 2048, with_transfer: bool = True) -> dict:
    """A profile dict in `tandem profile`'s schema, from a step-time model (the roofline above, or
    `LinearSteps`)."""
    news = [2 ** k for k in range(0, 15)]
    cacheds = [0, 1024, 4096, 16384, 65536]
    decodes = [(b, b * ctx) for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)
               for ctx in (128, 1024, 4096, 16384)]
    mixed = [(n, c, b, b * 2048) for n in (256, 1024, 2048) for c in (0, 4096)
             for b in (1, 16, 64)]
    sizes = [block_size * roofline.kv_bytes_per_token * n for n in (1, 16, 256, 4096)]
    profile = {
        "schema": "tandem.profile/1", "model": "synthetic:llama-3.1-8b",
        "device_name": "roofline (not measured)", "date": None, "tandem_version": None,
        "block_size": block_size, "kv_bytes_per_token": roofline.kv_bytes_per_token,
        "engine": {"block_size": block_size, "resolved_num_kv_blocks": num_kv_blocks,
                   "resolved_max_model_len": max_model_len,
                   "max_num_batched_tokens": max_num_batched_tokens},
        "prefill": [{"num_new_tokens": n, "num_cached_tokens": c,
                     "seconds": roofline.prefill_s(n, c)} for c in cacheds for n in news],
        "decode": [{"batch_size": b, "num_context_tokens": k, "seconds": roofline.decode_s(b, k)}
                   for b, k in decodes],
        "mixed": [{"num_prefill_tokens": n, "num_prefill_cached_tokens": c,
                   "num_decode_seqs": b, "num_decode_context_tokens": k,
                   "seconds": roofline.prefill_s(n + b, c) + roofline.decode_s(b, k)
                   - roofline.overhead_s - roofline.weight_bytes / roofline.memory_bytes_per_s}
                  for n, c, b, k in mixed],
        "transfer": {"points": [{"num_bytes": s, "seconds": roofline.transfer_latency_s
                                 + s / roofline.transfer_bytes_per_s} for s in sizes]
                     if with_transfer else []},
    }
    return profile
