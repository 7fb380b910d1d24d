"""The token counts that steps which are not decode-only are captured for (engine/step_graphs.py),
the batch sizes decode steps are captured for (engine/cuda_graphs.py), and what a step of n tokens
or n sequences runs as. Pure: the performance model prices steps with it too."""

from __future__ import annotations

import bisect
import functools

# Past this a step's device time hides its eager launches even for a small model (qwen3-0.6b: 4096
# tokens took 14 ms on H200), and capturing larger steps would lengthen start-up for nothing.
MAX_TOKENS = 8192


@functools.lru_cache(maxsize=64)
def bucket_sizes(max_tokens: int) -> tuple[int, ...]:
    """Token counts a piece is captured for: 16 to 64 by 16, 32 apart up to 256 (where a step's
    time is its weight reads, whatever its rows), then eighths of the way to the next power of
    two, so that padding adds at most an eighth to a step's work."""
    sizes = [16, 32, 48, 64] + list(range(96, 257, 32))
    edge = 256
    while edge < max_tokens:
        sizes += [edge + edge // 8 * k for k in range(1, 9)]
        edge *= 2
    return tuple(sorted({s for s in sizes if s < max_tokens} | {max_tokens}))


def padded_tokens(num_tokens: int, max_tokens: int) -> int:
    """The rows a step of num_tokens computes when steps up to max_tokens are captured: its
    bucket's, or its own past the largest bucket (an eager step)."""
    sizes = bucket_sizes(max_tokens)
    i = bisect.bisect_left(sizes, num_tokens)
    return sizes[i] if i < len(sizes) else num_tokens


MAX_DECODE_BATCH = 256   # decode graphs are captured up to min(max_num_seqs, this)


@functools.lru_cache(maxsize=64)
def decode_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a decode step is captured for: 1, 2, 4, 8, then every 16 up to max_batch."""
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return tuple(sorted({s for s in sizes if s <= max_batch} | {max_batch}))


def padded_batch(num_seqs: int, max_batch: int) -> int:
    """The batch a decode step of num_seqs sequences runs as when decode steps up to max_batch
    are captured: its graph's (the padding rows read no KV), or its own past the largest."""
    sizes = decode_batch_sizes(max_batch)
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else num_seqs
