"""The runs of the KV index (router/kv_index.py): hashes stored one after another, each with the
bitmask of the workers holding it, and the pure helpers that compare, split and mend them.

A run is a list the index walks and edits by position; these functions see only a run's lists,
so they are kept here, apart from the index's bookkeeping of workers, events and slots.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field

FIRST_WINDOW = 16  # hashes compared before trusting a run's prediction with longer windows
MIN_SPAN = 8  # removals shorter than this go hash by hash: the span check costs more there


@dataclass(slots=True, eq=False)
class Run:
    """Hashes stored one after another, each with the bitmask of the workers holding it."""
    run_id: int
    hashes: list[int] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)
    breaks: list[int] = field(default_factory=list)  # sorted p > 0 where masks[p] != masks[p-1]
    num_live_slots: int = 0                           # positions whose mask is not 0
    is_chain: bool = True  # each hash is the parent of the next (False once a snapshot appended)


def agreeing_length(run: Run, offset: int, block_hashes: list[int], position: int,
                     span: int) -> int:
    """How many of run.hashes[offset:] and block_hashes[position:] agree before the first
    difference, looking at most `span` far; the first pair is known to agree."""
    hashes = run.hashes
    if run.is_chain:  # agreeing at k means agreeing before k: bisect on single hashes
        return bisect_left(range(span), True,
                           key=lambda k: hashes[offset + k] != block_hashes[position + k])
    return agreeing_stretch(hashes, offset, 1, block_hashes, position, span)


def agreeing_stretch(hashes: list[int], offset: int, step: int, block_hashes: list[int],
                     position: int, span: int) -> int:
    """How many of block_hashes[position:] equal hashes[offset], hashes[offset + step], ... in
    turn (step 1 or -1), looking at most `span` far; the first pair is known to agree. Windows
    grow fourfold while they agree, then bisection finds the first difference, all in C list
    compares."""
    def agrees(low: int, high: int) -> bool:
        if step == 1:
            return hashes[offset + low:offset + high] == block_hashes[position + low:position + high]
        return (hashes[offset - high + 1:offset - low + 1][::-1]
                == block_hashes[position + low:position + high])

    low, window = 1, FIRST_WINDOW
    while low < span:
        high = min(low + window, span)
        if not agrees(low, high):
            break
        low, window = high, window * 4
    else:
        return span
    while high - low > 1:  # everything before `low` agrees; something in [low, high) differs
        middle = (low + high) // 2
        if agrees(low, middle):
            low = middle
        else:
            high = middle
    return low


def overlap(spans: list[tuple]) -> bool:
    """Whether two stretches (run, low, high, ...) share a slot (the same hash twice in one
    event)."""
    by_run: dict[int, list[tuple[int, int]]] = {}
    for run, low, high, *_ in spans:
        by_run.setdefault(id(run), []).append((low, high))
    for ranges in by_run.values():
        ranges.sort()
        if any(b_low <= a_high for (_, a_high), (b_low, _) in zip(ranges, ranges[1:])):
            return True
    return False


def touch(touched: dict[Run, list[int]], run: Run, offset: int) -> None:
    span = touched.get(run)
    if span is None:
        touched[run] = [offset, offset]
    elif offset < span[0]:
        span[0] = offset
    elif offset > span[1]:
        span[1] = offset


def pop_lone_tail(run: Run, offset: int, bit: int) -> bool:
    """Drop the run's last slot if it is `offset`, held by `bit` alone, after a live slot: what
    forgetting it and settling the run would do (one-block evictions, most removal events).
    False, changing nothing, otherwise."""
    masks = run.masks
    if offset == 0 or offset != len(masks) - 1 or masks[offset] != bit or not masks[offset - 1]:
        return False
    run.hashes.pop()
    masks.pop()
    run.num_live_slots -= 1
    if run.breaks and run.breaks[-1] == offset:
        run.breaks.pop()
    return True


def drop_slots(slots: dict[int, int], hashes: list[int]) -> None:
    """Delete the hashes' slots: a loop's `del` costs 2/3 of a map over dict.__delitem__."""
    for block_hash in hashes:
        del slots[block_hash]


def refresh_breaks(run: Run, low: int, high: int) -> None:
    """Recompute the breaks that masks[low:high + 1] can affect: positions low .. high + 1."""
    masks, breaks = run.masks, run.breaks
    first, last = max(low, 1), min(high + 1, len(masks) - 1)
    if last - first > MIN_SPAN and masks[low:high + 1].count(masks[low]) == high + 1 - low:
        # One mask over low..high (a stretch stored or forgotten by one worker): breaks can only
        # be at its two ends, found without a pass over the stretch.
        ends = (low, high + 1)
        changes = [p for p in ends if first <= p <= last and masks[p] != masks[p - 1]]
    else:
        changes = [p for p in range(first, last + 1) if masks[p] != masks[p - 1]]
    breaks[bisect_left(breaks, first):bisect_right(breaks, last)] = changes


def chains_of(block_hashes: Iterable[int], parent_hashes: Iterable[int | None]
            ) -> list[tuple[int | None, list[int]]]:
    """Split hashes into chains: a hash whose parent is the hash before it extends the chain."""
    chains: list[tuple[int | None, list[int]]] = []
    previous = None
    for block_hash, parent in zip(block_hashes, parent_hashes, strict=True):
        if chains and parent is not None and parent == previous:
            chains[-1][1].append(block_hash)
        else:
            chains.append((parent, [block_hash]))
        previous = block_hash
    return chains
