"""Integer helpers for the kernels' host wrappers.

Triton's `triton.cdiv` and `triton.next_power_of_2` are constexpr functions: called from Python
each costs 3-4 us, and an eager step's wrappers call them for every launch of every layer.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """a / b rounded up, for a >= 0 and b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
