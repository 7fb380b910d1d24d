"""The token counts that steps which are not decode-only are captured for (engine/step_graphs.py),
and the count a step of n tokens runs as. Pure: the performance model prices steps with it too."""

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
