"""KVRegion: what a peer needs to address our KV blocks, and its wire encoding.

NIXL's agent metadata tells a peer how to reach our registered memory, but not where our blocks
are inside it. `KVRegion` carries that: the base address of the KV tensor, the size of one block,
how many blocks there are, and which memory (host DRAM, or VRAM on which GPU). It crosses process
boundaries (over gRPC later), so it encodes as a small JSON object with a format tag, never pickle
(DESIGN.md, "Wire": nothing received from the network is unpickled), and decoding checks every
field before anything uses it as an address.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MEMORY_TYPES = ("DRAM", "VRAM")
REGION_FORMAT = "tandem.kv_region.v1"
# Far above any honest encoding (about 150 bytes); refuse to parse anything larger.
MAX_ENCODED_NBYTES = 4096
ADDRESS_LIMIT = 2**64
_INT_FIELDS = ("base_addr", "block_nbytes", "num_blocks", "dev_id")


@dataclass(frozen=True, slots=True)
class KVRegion:
    """Where one worker's KV blocks live: block i is at `base_addr + i * block_nbytes`."""

    base_addr: int
    block_nbytes: int
    num_blocks: int
    dev_id: int
    mem_type: str  # "DRAM" (host memory) or "VRAM" (GPU memory; dev_id is the CUDA index)

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"KVRegion.{name} must be an int, got {value!r}")
        if self.base_addr <= 0:
            raise ValueError(f"KVRegion.base_addr must be a positive address, not {self.base_addr}")
        if self.block_nbytes <= 0 or self.num_blocks <= 0:
            raise ValueError(
                f"KVRegion needs at least one block of at least one byte, got num_blocks="
                f"{self.num_blocks}, block_nbytes={self.block_nbytes}"
            )
        if self.base_addr + self.block_nbytes * self.num_blocks > ADDRESS_LIMIT:
            raise ValueError("KVRegion reaches past the 64-bit address space")
        if self.dev_id < 0:
            raise ValueError(f"KVRegion.dev_id must be >= 0, got {self.dev_id}")
        if self.mem_type not in MEMORY_TYPES:
            raise ValueError(f"KVRegion.mem_type must be DRAM or VRAM, not {self.mem_type!r}")

    @property
    def total_nbytes(self) -> int:
        return self.block_nbytes * self.num_blocks

    @classmethod
    def from_tensor(cls, kv_cache: torch.Tensor) -> KVRegion:
        """The region of a contiguous KV tensor whose first dimension is the block index."""
        if kv_cache.dim() < 1 or kv_cache.shape[0] == 0 or kv_cache.numel() == 0:
            raise ValueError(f"the KV cache holds no blocks: shape {tuple(kv_cache.shape)}")
        if not kv_cache.is_contiguous():
            raise ValueError(
                "the KV cache must be contiguous so that each block is one memory region; "
                "allocate it with torch.empty(shape) rather than as a view or a transpose"
            )
        num_blocks = kv_cache.shape[0]
        is_cuda = kv_cache.device.type == "cuda"
        if not is_cuda and kv_cache.device.type != "cpu":
            raise ValueError(f"KV cache on {kv_cache.device} is not supported: use cpu or cuda")
        return cls(
            base_addr=kv_cache.data_ptr(),
            block_nbytes=kv_cache.numel() // num_blocks * kv_cache.element_size(),
            num_blocks=num_blocks,
            dev_id=kv_cache.device.index if is_cuda else 0,  # NIXL takes 0 for host memory
            mem_type="VRAM" if is_cuda else "DRAM",
        )

    def to_bytes(self) -> bytes:
        return json.dumps({"format": REGION_FORMAT, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KVRegion:
        """Decode `to_bytes` output; ValueError on anything else."""
        if len(data) > MAX_ENCODED_NBYTES:
            raise ValueError(
                f"a KVRegion encoding is under {MAX_ENCODED_NBYTES} bytes, got {len(data)}"
            )
        try:
            fields = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a KVRegion encoding: {e}") from e
        if not isinstance(fields, dict) or fields.pop("format", None) != REGION_FORMAT:
            raise ValueError(
                f"not a KVRegion encoding: expected a JSON object with format {REGION_FORMAT!r}"
            )
        expected = set(_INT_FIELDS) | {"mem_type"}
        if set(fields) != expected:
            raise ValueError(
                f"KVRegion encoding has fields {sorted(fields)}, expected {sorted(expected)}"
            )
        return cls(**fields)
