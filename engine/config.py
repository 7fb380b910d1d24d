"""Engine configuration: one dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("prefill", "decode", "both")


@dataclass(slots=True)
class EngineConfig:
    model: str = "random:tiny"         # an HF model directory or random:<preset>
    role: str = "both"                 # prefill | decode | both; picks the scheduling policy
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                # auto: float32 on a CPU (matches HF there), bfloat16 on a GPU
    seed: int = 0                      # random:<preset> weights and unseeded sampling
    block_size: int = 16               # tokens per KV block; 16 makes a Llama-3.1-8B block 2 MiB
    num_kv_blocks: int | None = None   # None: sized from memory (below)
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 0.5      # KV cache size on a CPU, where there is no memory probe
    max_num_seqs: int = 256            # sequences running at once
    max_num_batched_tokens: int = 2048  # token budget of one step, prefill chunks included
    max_model_len: int | None = None   # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False        # True: no CUDA graphs

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
