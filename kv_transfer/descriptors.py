"""Block ids to NIXL descriptors: the pure half of a KV pull.

A worker's KV cache is one tensor of shape
`[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`, so block `i` is the contiguous
byte range `[base_addr + i * block_nbytes, base_addr + (i + 1) * block_nbytes)` and holds that
block for every layer (DESIGN.md, "KV layout"). A pull pairs source blocks (on the worker that
owns the data) with destination blocks (on the worker that reads it); wherever both sides advance
by one block at a time, the pairs collapse into one run and the run into one descriptor per side.
Fewer, larger descriptors are what lets UCX reach its bandwidth.

A descriptor is NIXL's `(addr, nbytes, dev_id)` tuple. Nothing here imports NIXL or touches memory.
"""

from __future__ import annotations

from collections.abc import Sequence

# (src_start, dst_start, num_blocks): src_start..src_start+num_blocks-1 moves to
# dst_start..dst_start+num_blocks-1.
BlockRun = tuple[int, int, int]
# (addr, nbytes, dev_id), the tuple NIXL takes for one transfer descriptor.
Descriptor = tuple[int, int, int]


def coalesce_block_runs(src_block_ids: list[int], dst_block_ids: list[int]) -> list[BlockRun]:
    """Pair `src_block_ids[k]` with `dst_block_ids[k]` and merge pairs consecutive on both sides.

    The order of the pairs is kept (no sorting): a run only extends the run just before it, so the
    result lists every pair exactly once, in the caller's order. Ids must be non-negative and the
    destination ids distinct (two pairs writing one block would race); ranges are checked by
    `check_block_ids`, which knows the cache sizes.
    """
    _check_pairs(src_block_ids, dst_block_ids)
    runs: list[BlockRun] = []
    for src, dst in zip(src_block_ids, dst_block_ids):
        if runs:
            run_src, run_dst, num_blocks = runs[-1]
            if src == run_src + num_blocks and dst == run_dst + num_blocks:
                runs[-1] = (run_src, run_dst, num_blocks + 1)
                continue
        runs.append((src, dst, 1))
    return runs


def src_descriptors(
    runs: Sequence[BlockRun], base_addr: int, block_nbytes: int, dev_id: int
) -> list[Descriptor]:
    """Descriptors for the source side of `runs` (the remote side of a READ)."""
    return [_run_descriptor(src, n, base_addr, block_nbytes, dev_id) for src, _, n in runs]


def dst_descriptors(
    runs: Sequence[BlockRun], base_addr: int, block_nbytes: int, dev_id: int
) -> list[Descriptor]:
    """Descriptors for the destination side of `runs` (the local side of a READ)."""
    return [_run_descriptor(dst, n, base_addr, block_nbytes, dev_id) for _, dst, n in runs]


def check_block_ids(block_ids: Sequence[int], num_blocks: int, side: str) -> None:
    """Raise ValueError unless every id addresses one of `num_blocks` blocks of `side`."""
    for block_id in block_ids:
        if isinstance(block_id, bool) or not isinstance(block_id, int):
            raise ValueError(f"{side} block ids must be ints, got {block_id!r}")
        if not 0 <= block_id < num_blocks:
            raise ValueError(
                f"{side} block id {block_id} is out of range: that cache has {num_blocks} blocks "
                f"(valid ids 0..{num_blocks - 1})"
            )


def _check_pairs(src_block_ids: Sequence[int], dst_block_ids: Sequence[int]) -> None:
    if len(src_block_ids) == 0:
        raise ValueError("nothing to transfer: the block id lists are empty")
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(
            f"every source block needs one destination block: got {len(src_block_ids)} source "
            f"ids and {len(dst_block_ids)} destination ids"
        )
    for ids, side in ((src_block_ids, "source"), (dst_block_ids, "destination")):
        for block_id in ids:
            if isinstance(block_id, bool) or not isinstance(block_id, int) or block_id < 0:
                raise ValueError(f"{side} block ids must be non-negative ints, got {block_id!r}")
    if len(set(dst_block_ids)) != len(dst_block_ids):
        raise ValueError(f"destination block ids must be distinct, got {list(dst_block_ids)}")


def _run_descriptor(
    start: int, num_blocks: int, base_addr: int, block_nbytes: int, dev_id: int
) -> Descriptor:
    return (base_addr + start * block_nbytes, num_blocks * block_nbytes, dev_id)
