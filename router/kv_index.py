"""KV index: which workers of one pool hold which prompt prefixes, kept from their KV event streams.

The router keeps one index per pool (prefill, decode). Workers publish what their prefix caches
gain and lose (tandem.contracts.kv_events); the index replays those events and answers one question per
request: for a prompt's chained block hashes (tandem.contracts.block_hash), how many leading blocks does each
worker already hold? A chained hash names its whole prefix, so a worker's overlap is the number of
leading hashes it holds, counted up to its first miss; a worker holding a later block but not the
first has overlap 0.

Event contract. Every worker numbers its events 0, 1, 2, ... `apply` takes an event only when its
id is exactly the last applied id + 1; otherwise it changes nothing and returns False, and the
caller asks that worker for a snapshot (`load_snapshot`), after which events continue from the
snapshot's id + 1. A worker just added expects event 0. Adding a worker id that is already known
starts it afresh (a registration means a new process, whose cache is empty and whose ids restart).

Representation, and why. Each worker owns one bit; each cached hash carries the bitmask of the
workers holding it. A query ANDs the masks along the prompt and stops when no worker still matches;
a worker's overlap is where its bit drops out. Looking every prompt hash up in a dict of millions
of entries costs a cache miss or more per block (benchmarks/router_bench.py measures it), too slow
for long prompts, so hashes live in *runs*: a hash stored right after the hash that ends a run is
appended to that run, so a run follows a conversation's chain as it was cached. A query looks the
prompt's hash up once, finds how far the prompt and the run agree, and visits only the positions
where the run's mask changes (`breaks`). A run built from BlockStored events is a true chain (each
hash the parent of the next), and so is a prompt: there, as everywhere in tandem, an equal hash
means an equal prefix, so the agreeing length is found by bisection on single hashes (about 10
compares for 1024 blocks). A run built from a snapshot, whose order says nothing about parents, is
compared hash by hash (in C, still far cheaper than a dict lookup per block). Masks decide who holds
what, so a worker missing any block of the prefix drops out there, whatever the run says.

The hash -> slot dict stores plain ints (run id and offset packed), which the garbage collector does
not track: with millions of hashes, tracked tuples would make every full collection walk them all.
Each worker keeps its block count and the ids of the runs it touched (for clearing, removal and
snapshots), not a set of its hashes. When the last holder of a hash drops it, its slot stays in its
run (mask 0) unless it is at the run's tail, which is trimmed; a run with no live slot is dropped.
LRU eviction frees a prefix's tail first, so dead slots rarely linger.

The index does no I/O and keeps no clock.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tandem.contracts.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from tandem.router.kv_runs import (MIN_SPAN, Run, agreeing_length, agreeing_stretch, chains_of,
                                   drop_slots, overlap, pop_lone_tail, refresh_breaks, touch)

logger = logging.getLogger(__name__)

_OFFSET_BITS = 32
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1
_MAX_NAMED_MASKS = 4096  # memoised mask -> worker ids; few distinct sets drop out together


@dataclass(slots=True)
class _Worker:
    bit: int                                        # 1 << this worker's position in every mask
    next_event_id: int = 0                          # the only event id `apply` accepts next
    num_blocks: int = 0
    run_ids: set[int] = field(default_factory=set)  # every run it may hold slots in (a superset)


class KVIndex:
    def __init__(self) -> None:
        self._workers: dict[str, _Worker] = {}
        self._worker_of_bit: dict[int, str] = {}
        self._workers_in_mask: dict[int, tuple[str, ...]] = {}
        self._slots: dict[int, int] = {}           # hash -> run_id << 32 | offset in that run
        self._runs: list[Run | None] = []         # by run id; None: free
        self._free_run_ids: list[int] = []
        self._all_bits = 0

    # ---- membership ----------------------------------------------------------------------------

    def add_worker(self, worker_id: str) -> None:
        """Start tracking a worker with an empty cache that will send event 0 next."""
        self.remove_worker(worker_id)
        bit = 1
        while bit in self._worker_of_bit:
            bit <<= 1
        self._workers[worker_id] = _Worker(bit)
        self._worker_of_bit[bit] = worker_id
        self._all_bits |= bit
        self._workers_in_mask.clear()

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker and every block it held; unknown ids are ignored."""
        worker = self._workers.pop(worker_id, None)
        if worker is not None:
            self._forget_all(worker)
            del self._worker_of_bit[worker.bit]
            self._all_bits &= ~worker.bit
            self._workers_in_mask.clear()

    def workers(self) -> list[str]:
        """Tracked worker ids, in the order they were added."""
        return list(self._workers)

    def num_blocks(self, worker_id: str) -> int:
        """Blocks the worker holds; 0 for a worker the index does not track."""
        worker = self._workers.get(worker_id)
        return worker.num_blocks if worker is not None else 0

    def last_event_id(self, worker_id: str) -> int:
        """Id of the last event applied for the worker (-1 before its first)."""
        return self._worker(worker_id).next_event_id - 1

    # ---- events and snapshots ------------------------------------------------------------------

    def apply(self, worker_id: str, event: KVEvent) -> bool:
        """Apply one event; False (and nothing changed) when its id does not follow the last one."""
        worker = self._worker(worker_id)
        if event.event_id != worker.next_event_id:
            logger.debug("worker %s: KV event %d arrived, %d expected; a snapshot is needed",
                         worker_id, event.event_id, worker.next_event_id)
            return False
        if isinstance(event, BlockStored):
            if not self._store_fresh(worker, event.parent_hash, event.block_hashes):
                self._store(worker, event.parent_hash, event.block_hashes)
        elif isinstance(event, BlockRemoved):
            self._forget(worker, event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            self._forget_all(worker)
        else:
            raise TypeError(f"not a KV event: {event!r}")
        worker.next_event_id += 1
        return True

    def apply_many(self, worker_id: str, events: Iterable[KVEvent]) -> bool:
        """Apply events in order; stops and returns False at the first one out of sequence."""
        return all(self.apply(worker_id, event) for event in events)

    def load_snapshot(self, worker_id: str, last_event_id: int, block_hashes: Iterable[int],
                      parent_hashes: Iterable[int | None] | None = None) -> None:
        """Replace the worker's blocks with exactly `block_hashes`, as of event `last_event_id`.

        Pass -1 when the worker has sent no event yet. Hashes listed in the order they were cached
        (BlockManager.cached_hashes) make the fastest runs; any order gives the same answers.
        With `parent_hashes` (each hash's parent, None for a first block) the snapshot is replayed
        as the chains it holds, so its runs are bisected like runs built from events.
        """
        if last_event_id < -1:
            raise ValueError(f"last_event_id must be -1 (no event yet) or more, got "
                             f"{last_event_id}")
        worker = self._worker(worker_id)
        self._forget_all(worker)
        if parent_hashes is None:
            self._store(worker, None, block_hashes, is_chain=False)
        else:
            for parent, chain in chains_of(block_hashes, parent_hashes):
                self._store(worker, parent, chain)
        worker.next_event_id = last_event_id + 1

    # ---- queries -------------------------------------------------------------------------------

    def overlaps(self, block_hashes: list[int]) -> dict[str, int]:
        """Each worker's matched prefix length in blocks; workers matching 0 blocks are omitted.

        `block_hashes` are a prompt's chained hashes in order (tandem.contracts.block_hash).
        """
        return self._walk(block_hashes, self._all_bits)

    def overlap_blocks(self, worker_id: str, block_hashes: list[int]) -> int:
        """How many leading blocks of the prompt one worker holds (0 for an unknown worker)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return 0
        return self._walk(block_hashes, worker.bit).get(worker_id, 0)

    # ---- query internals -----------------------------------------------------------------------

    def _worker(self, worker_id: str) -> _Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise ValueError(f"worker {worker_id!r} is not in the KV index; call add_worker first")
        return worker

    def _walk(self, block_hashes: list[int], alive: int) -> dict[str, int]:
        depths: dict[str, int] = {}
        num_blocks = len(block_hashes)
        position = 0
        while alive and position < num_blocks:
            code = self._slots.get(block_hashes[position])
            if code is None:
                break
            run, offset = self._runs[code >> _OFFSET_BITS], code & _OFFSET_MASK
            span = min(len(run.hashes) - offset, num_blocks - position)
            matched = agreeing_length(run, offset, block_hashes, position, span)
            alive = self._narrow(alive, run, offset, matched, position, depths)
            position += matched
        self._record(alive, position, depths)
        return depths

    def _narrow(self, alive: int, run: Run, offset: int, matched: int, position: int,
                depths: dict[str, int]) -> int:
        """AND in the masks of run[offset:offset + matched]; who drops out gets its depth."""
        masks, breaks = run.masks, run.breaks
        changes = breaks[bisect_right(breaks, offset):bisect_left(breaks, offset + matched)]
        for run_position in [offset, *changes]:
            narrowed = alive & masks[run_position]
            if narrowed != alive:
                self._record(alive ^ narrowed, position + run_position - offset, depths)
                alive = narrowed
                if not alive:
                    break
        return alive

    def _record(self, bits: int, depth: int, depths: dict[str, int]) -> None:
        if depth == 0:
            return
        workers = self._workers_in_mask.get(bits)
        if workers is None:
            workers = self._name_workers(bits)
        for worker_id in workers:
            depths[worker_id] = depth

    def _name_workers(self, bits: int) -> tuple[str, ...]:
        if len(self._workers_in_mask) >= _MAX_NAMED_MASKS:
            self._workers_in_mask.clear()
        workers = []
        remaining = bits
        while remaining:
            lowest = remaining & -remaining
            workers.append(self._worker_of_bit[lowest])
            remaining ^= lowest
        self._workers_in_mask[bits] = tuple(workers)
        return self._workers_in_mask[bits]

    # ---- event internals -----------------------------------------------------------------------

    def _store(self, worker: _Worker, parent_hash: int | None, block_hashes: Iterable[int],
               is_chain: bool = True) -> None:
        bit, slots, runs = worker.bit, self._slots, self._runs
        block_hashes = list(block_hashes)
        if is_chain and len(block_hashes) >= MIN_SPAN and block_hashes[0] in slots:
            # A prefix other workers hold already: marked in one pass where it is one stretch.
            codes = list(map(slots.get, block_hashes))
            num_known = codes.index(None) if None in codes else len(codes)
            if num_known >= MIN_SPAN and self._mark_span(worker, codes[:num_known]):
                parent_hash, block_hashes = block_hashes[num_known - 1], block_hashes[num_known:]
        code = slots.get(parent_hash) if parent_hash is not None else None
        run, offset = (runs[code >> _OFFSET_BITS], code & _OFFSET_MASK) if code is not None \
            else (None, -1)
        touched: dict[Run, list[int]] = {}
        # The tail check is made once, at the first new hash, and only where a tail is long.
        may_append_rest = len(block_hashes) >= MIN_SPAN
        for position, block_hash in enumerate(block_hashes):
            code = slots.get(block_hash)
            if code is None:  # new to the index: after its predecessor if that ends a run
                if run is None or offset != len(run.hashes) - 1:
                    run = self._new_run()
                elif not is_chain:
                    run.is_chain = False
                if may_append_rest:
                    may_append_rest = False
                    rest = block_hashes[position:]
                    if slots.keys().isdisjoint(rest) and len(set(rest)) == len(rest):
                        if not is_chain and len(rest) > 1:
                            run.is_chain = False
                        self._append_run(worker, run, rest, touched)
                        break
                run.hashes.append(block_hash)
                run.masks.append(bit)
                run.num_live_slots += 1
                offset = len(run.hashes) - 1
                slots[block_hash] = run.run_id << _OFFSET_BITS | offset
            else:
                run, offset = runs[code >> _OFFSET_BITS], code & _OFFSET_MASK
                mask = run.masks[offset]
                if mask & bit:
                    continue
                run.num_live_slots += mask == 0
                run.masks[offset] = mask | bit
            worker.num_blocks += 1
            touch(touched, run, offset)
        for run, (low, high) in touched.items():
            worker.run_ids.add(run.run_id)
            refresh_breaks(run, low, high)

    def _store_fresh(self, worker: _Worker, parent_hash: int | None,
                     block_hashes: Sequence[int]) -> bool:
        """_store for a chain none of whose hashes the index holds: a prompt's fresh blocks or an
        output block, most events. False, changing nothing, when its first hash is held.

        The hashes go in with one dict update, whose growth proves them all new and distinct (a
        later hash of a chain held while its first is not happens where a worker keeps a block
        but not its parent: never in the whole conversation trace); otherwise the update is undone
        from the runs, which hold every slot's hash, and _store takes the event.
        """
        slots = self._slots
        num_new = len(block_hashes)
        if not num_new or block_hashes[0] in slots:
            return False
        code = slots.get(parent_hash) if parent_hash is not None else None
        run = self._runs[code >> _OFFSET_BITS] if code is not None else None
        if run is not None and code & _OFFSET_MASK == len(run.hashes) - 1:
            run_id, start = run.run_id, len(run.hashes)
        else:  # a new run, taking the id _new_run would
            run = None
            run_id, start = (self._free_run_ids[-1] if self._free_run_ids else len(self._runs)), 0
        low_code = run_id << _OFFSET_BITS | start
        num_slots = len(slots)
        slots.update(zip(block_hashes, range(low_code, low_code + num_new)))
        if len(slots) - num_slots != num_new:
            self._undo_update(block_hashes)
            return False
        if run is None:
            run = self._new_run()
        bit = worker.bit
        run.hashes.extend(block_hashes)
        run.masks.extend([bit] * num_new)
        run.num_live_slots += num_new
        worker.num_blocks += num_new
        worker.run_ids.add(run_id)
        if start and run.masks[start - 1] != bit:  # one mask over the new slots: a break only
            run.breaks.append(start)  # at start (refresh_breaks inlined: 1/4 of a 1-block store)
        return True

    def _undo_update(self, block_hashes: Sequence[int]) -> None:
        """Put back the slots of hashes a dict update overwrote, and drop the ones it added."""
        hashes = set(block_hashes)
        slots = self._slots
        drop_slots(slots, hashes)
        for run in self._runs:
            for position, block_hash in enumerate(run.hashes if run is not None else ()):
                if block_hash in hashes:
                    slots[block_hash] = run.run_id << _OFFSET_BITS | position

    def _mark_span(self, worker: _Worker, codes: list[int]) -> bool:
        """_store for hashes the index holds as one ascending stretch of one run, none of them
        held by the worker yet. False, changing nothing, otherwise."""
        low_code, high_code = codes[0], codes[-1]
        if (low_code >> _OFFSET_BITS != high_code >> _OFFSET_BITS
                or codes != list(range(low_code, high_code + 1))):
            return False
        run = self._runs[low_code >> _OFFSET_BITS]
        low, high = low_code & _OFFSET_MASK, high_code & _OFFSET_MASK
        bit = worker.bit
        masks = run.masks[low:high + 1]
        if [mask & bit for mask in masks].count(0) != len(masks):
            return False
        run.masks[low:high + 1] = [mask | bit for mask in masks]
        run.num_live_slots += masks.count(0)
        worker.num_blocks += len(codes)
        worker.run_ids.add(run.run_id)
        refresh_breaks(run, low, high)
        return True

    def _append_run(self, worker: _Worker, run: Run, new_hashes: list[int],
                    touched: dict[Run, list[int]]) -> None:
        """Append hashes new to the index at the end of `run`, held by `worker` alone.

        A prompt's fresh tail is usually hundreds of blocks; doing it in C-level passes keeps the
        router's per-request work small. The new slots share one mask, so the only break they can
        add is at their first position, which refreshing that one position finds.
        """
        start = len(run.hashes)
        run.hashes.extend(new_hashes)
        run.masks.extend([worker.bit] * len(new_hashes))
        run.num_live_slots += len(new_hashes)
        base = run.run_id << _OFFSET_BITS
        self._slots.update(zip(new_hashes, range(base | start, base | len(run.hashes))))
        worker.num_blocks += len(new_hashes)
        touch(touched, run, start)

    def _forget(self, worker: _Worker, block_hashes: Iterable[int]) -> None:
        bit, slots, runs = worker.bit, self._slots, self._runs
        block_hashes = list(block_hashes)
        if len(block_hashes) >= MIN_SPAN and self._forget_span(worker, block_hashes):
            return
        code = slots.get(block_hashes[0]) if len(block_hashes) == 1 else None  # a decode step's
        if code is not None and pop_lone_tail(runs[code >> _OFFSET_BITS], code & _OFFSET_MASK, bit):
            del slots[block_hashes[0]]
            worker.num_blocks -= 1
            return
        touched: dict[Run, list[int]] = {}
        for block_hash in block_hashes:
            code = slots.get(block_hash)
            if code is None:
                continue
            run, offset = runs[code >> _OFFSET_BITS], code & _OFFSET_MASK
            mask = run.masks[offset]
            if not mask & bit:
                continue
            run.masks[offset] = mask ^ bit
            run.num_live_slots -= mask == bit
            worker.num_blocks -= 1
            span = touched.get(run)  # kv_runs.touch inlined: this loop runs once per evicted block
            if span is None:
                touched[run] = [offset, offset]
            elif offset < span[0]:
                span[0] = offset
            elif offset > span[1]:
                span[1] = offset
        self._settle(touched)

    def _forget_span(self, worker: _Worker, block_hashes: list[int]) -> bool:
        """_forget for the usual eviction: a few contiguous stretches of runs, every slot held by
        the worker (LRU frees a prefix's tail first, so one allocation evicts the tails of a few
        prompts in turn). False, changing nothing, otherwise."""
        stretches = self._stretches(block_hashes)
        if stretches is None:
            return False
        bit = worker.bit
        spans = []
        for run, low, high in stretches:
            masks = run.masks[low:high + 1]
            # Held by this worker alone (a fresh tail's usual state): known by one count, not a
            # pass per slot.
            num_alone = masks.count(bit)
            if num_alone != len(masks) and [mask & bit for mask in masks].count(0):
                return False
            spans.append((run, low, high, masks, num_alone))
        if len({(id(run), low) for run, low, *_ in spans}) != len(spans) or overlap(spans):
            return False
        touched: dict[Run, list[int]] = {}
        for run, low, high, masks, num_alone in spans:
            run.masks[low:high + 1] = ([0] * num_alone if num_alone == len(masks)
                                       else [mask ^ bit for mask in masks])
            run.num_live_slots -= num_alone
            touch(touched, run, low)
            touch(touched, run, high)
        worker.num_blocks -= len(block_hashes)
        self._settle(touched)
        return True

    def _stretches(self, block_hashes: list[int]) -> list[tuple[Run, int, int]] | None:
        """(run, lowest, highest offset) of each maximal stretch of the hashes that a run holds at
        offsets stepping by -1 (an LRU eviction: a prompt's tail, last block first) or +1, in
        order; None when a hash is not in the index or the stretches are many (scattered slots).
        One dict lookup a stretch: the rest of it is compared with the run's own list in C."""
        slots, runs = self._slots, self._runs
        num_hashes = len(block_hashes)
        max_stretches = num_hashes // MIN_SPAN
        stretches = []
        position = 0
        while position < num_hashes:
            code = slots.get(block_hashes[position])
            if code is None or len(stretches) == max_stretches:
                return None
            run, offset = runs[code >> _OFFSET_BITS], code & _OFFSET_MASK
            left = num_hashes - position
            length = agreeing_stretch(run.hashes, offset, -1, block_hashes, position,
                                      min(left, offset + 1))
            if length > 1:
                stretches.append((run, offset - length + 1, offset))
            else:
                length = agreeing_stretch(run.hashes, offset, 1, block_hashes, position,
                                          min(left, len(run.hashes) - offset))
                stretches.append((run, offset, offset + length - 1))
            position += length
        return stretches

    def _forget_all(self, worker: _Worker) -> None:
        bit = worker.bit
        touched: dict[Run, list[int]] = {}
        for run_id in worker.run_ids:
            run = self._runs[run_id]
            masks = run.masks if run is not None else []
            held = [p for p, mask in enumerate(masks) if mask & bit]
            for p in held:
                run.num_live_slots -= masks[p] == bit
                masks[p] ^= bit
            if held:
                touched[run] = [held[0], held[-1]]
        worker.run_ids.clear()
        worker.num_blocks = 0
        self._settle(touched)

    def _settle(self, touched: dict[Run, list[int]]) -> None:
        """After bits were cleared: drop dead runs, trim dead tails, recompute breaks."""
        for run, (low, high) in touched.items():
            if run.num_live_slots == 0:
                drop_slots(self._slots, run.hashes)
                self._runs[run.run_id] = None
                self._free_run_ids.append(run.run_id)
                continue
            end = len(run.masks)
            if high == end - 1 and not any(run.masks[low:end]):
                end = low  # an evicted tail: skip it in one C-level pass, not slot by slot
            while run.masks[end - 1] == 0:
                end -= 1
            drop_slots(self._slots, run.hashes[end:])
            del run.hashes[end:], run.masks[end:]
            del run.breaks[bisect_left(run.breaks, len(run.masks)):]
            refresh_breaks(run, low, high)

    def _new_run(self) -> Run:
        if self._free_run_ids:
            run = Run(self._free_run_ids.pop())
            self._runs[run.run_id] = run
        else:
            run = Run(len(self._runs))
            self._runs.append(run)
        return run

