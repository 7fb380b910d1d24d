"""KV transfer time over bytes, for the profile.

Between two GPUs it times a torch peer copy (`dst.copy_(src)` from one device to the other) of a run
of consecutive KV blocks: the copy path that a NIXL READ of coalesced block descriptors rides on.
It is not a NIXL measurement (NIXL is not needed, nor present, where profiles are taken); RESULTS.md
relates tandem's NIXL pulls to this peer copy (80-97% of it on an idle server). With no second
device, it times a local copy instead and says so under `method`, so nobody mistakes it for a
transfer between workers.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

logger = logging.getLogger(__name__)

BLOCK_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _time_copy_s(dst: torch.Tensor, src: torch.Tensor, devices: list[torch.device],
                 warmup: int, timed: int) -> float:
    def sync() -> None:
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    times = []
    for i in range(warmup + timed):
        sync()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_transfer(src_device: torch.device, dst_device: torch.device | None, block_bytes: int,
                     max_blocks: int = 1024, warmup: int = 3, timed: int = 10) -> dict:
    """Copy time of 1..max_blocks consecutive blocks of block_bytes each, src to dst device.

    dst_device None means no second device: the copy is local, within src_device's memory.
    """
    counts = [n for n in BLOCK_COUNTS if n <= max_blocks]
    target = dst_device or src_device
    src = torch.empty(max(counts) * block_bytes, dtype=torch.uint8, device=src_device)
    src.random_(0, 256)  # real bytes: never time on zeros
    dst = torch.empty_like(src, device=target)
    devices = [src_device] if dst_device is None else [src_device, dst_device]
    points = []
    for n in counts:
        size = n * block_bytes
        seconds = _time_copy_s(dst[:size], src[:size], devices, warmup, timed)
        points.append({"num_blocks": n, "num_bytes": size, "seconds": seconds})
    del src, dst
    if src_device.type == "cuda":
        torch.cuda.empty_cache()
    if dst_device is None:
        method = f"local_copy: {src_device} to {src_device} (no second device; not a transfer "\
                 f"between workers)"
    else:
        peer = torch.cuda.can_device_access_peer(src_device.index or 0, dst_device.index or 0)
        method = f"torch_peer_copy: {src_device} to {dst_device}, one run of consecutive blocks "\
                 f"(peer access {'on' if peer else 'off'})"
    rate = points[-1]["num_bytes"] / points[-1]["seconds"] / 1e9
    logger.info("transfer: %s; %.1f GB/s at %d blocks", method, rate, counts[-1])
    return {"method": method, "block_bytes": block_bytes, "warmup": warmup, "repeats": timed,
            "statistic": "median", "points": points}


def peer_device(device: torch.device, asked: str) -> torch.device | None:
    """The device to transfer to: `asked` ('auto', 'none' or a device), resolved."""
    if asked == "none" or device.type != "cuda":
        return None
    if asked != "auto":
        return torch.device(asked)
    if torch.cuda.device_count() < 2:
        return None
    index = device.index or 0
    return torch.device("cuda", 1 if index == 0 else 0)
