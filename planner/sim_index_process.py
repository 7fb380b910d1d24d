"""The router's KV indexes kept in a helper process, so that a simulation runs on two cores.

Why. On the whole conversation trace (8P + 8D) the block managers publish about 34M stored and
removed block hashes, and replaying them into the router's two indexes (router/kv_index.py) took
a quarter of the simulation, all of it on the event loop's one core. An index answers only when a
request is routed (`overlaps`); between two routings it takes events that nothing reads. So here
the real `KVIndex` objects live in a second process: every event is sent to it as it happens,
and a query waits for its answer. The pipe is ordered, so the helper has applied every event sent
before a query when it answers it: the same events, in the same order, and the same queries as in
one process, hence the same answers and the same simulation. The event loop only encodes.

Wire. Events and queries are packed into one array of u64 (block hashes are u64,
tandem.contracts.block_hash) and sent as raw bytes `FLUSH_VALUES` at a time, or at once before a
query; an empty message stops the helper:

    STORED       head, event id, parent hash, n, n hashes
    STORED_ROOT  head, event id, n, n hashes          (parent None)
    REMOVED      head, event id, n, n hashes
    CLEARED      head, event id
    QUERY        head, n, n hashes                    -> every pool's answer, pickled
    ADD          head, n, the worker id's UTF-8 bytes in n words

`head` is `code << 3 | kind`, where code numbers a (pool, worker) pair. A routing asks both pools
about one prompt, one after the other with no event between, so a query is answered for every
pool at once and the second is answered from that, without a round trip. Converting
hashes to u64 is what the event loop pays: about 45 ns a hash on the 2-core machine, against a
microsecond a block for the index's work. An event the helper's index refuses (its id does not
follow the last one: never, from a block manager) or an error there is raised in the simulator at
the next query.

The helper is started with "spawn", not "fork": a forked copy of a simulator that holds a whole
trace's prompts would make the simulator copy every page it then writes to.
"""

from __future__ import annotations

import logging
import multiprocessing
from array import array
from collections.abc import Sequence

from tandem.contracts.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from tandem.router.kv_index import KVIndex

logger = logging.getLogger(__name__)

STORED, STORED_ROOT, REMOVED, CLEARED, QUERY, ADD = range(6)
# 8 KiB a message: the helper applies one while the next fills, and a query waits only for the
# last one's events.
FLUSH_VALUES = 1 << 10
# Fewer hashes than this are appended to the buffer one by one; more, converted as one array
# first (the buffer's extend takes an array as a copy: 45 ns a hash where one by one costs 75).
MIN_ARRAY_COPY = 16


class IndexProcess:
    """The helper process and one stand-in index per pool (`indexes`)."""

    def __init__(self, roles: Sequence[str] = ("decode", "prefill")):
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=serve, args=(child_conn,), daemon=True,
                                        name="tandem-sim-kv-index")
        self._process.start()
        child_conn.close()
        self._buffer = array("Q")
        self._num_codes = 0
        # The last query's hashes and every pool's answer to it, until the next event
        self._last_query: list[int] | None = None
        self._answers: list[dict[str, int]] | None = None
        self.indexes = {role: RemoteKVIndex(self, pool) for pool, role in enumerate(roles)}

    def close(self) -> None:
        """Stop the helper (what it holds is lost)."""
        if self._process.is_alive():
            self._conn.send_bytes(b"")
            self._process.join(timeout=10)
        self._conn.close()

    def _new_code(self, pool: int, worker_id: str) -> int:
        code = self._num_codes
        self._num_codes += 1
        name = array("Q")
        name.frombytes(worker_id.encode().ljust(-(-len(worker_id.encode()) // 8) * 8, b"\0"))
        self._buffer.extend((code << 3 | ADD, pool, len(name)))
        self._buffer.extend(name)
        return code

    def _flush(self) -> None:
        if self._buffer:
            self._conn.send_bytes(self._buffer)
            self._buffer = array("Q")

    def _ask(self, pool: int, block_hashes: list[int]) -> dict[str, int]:
        if self._answers is None or self._last_query != block_hashes:
            self._buffer.extend((QUERY, len(block_hashes)))
            _append_hashes(self._buffer, block_hashes)
            self._flush()
            answers = self._conn.recv()
            if isinstance(answers, str):
                raise RuntimeError(f"the KV index process failed: {answers}")
            self._last_query, self._answers = list(block_hashes), answers
        # A pool no worker has joined has no index there, and matches nothing.
        return dict(self._answers[pool]) if pool < len(self._answers) else {}


class RemoteKVIndex:
    """What the router and the simulator call of a `KVIndex`, applied in the helper process."""

    def __init__(self, owner: IndexProcess, pool: int):
        self._owner = owner
        self._pool = pool
        self._heads: dict[str, int] = {}  # worker id -> its code, shifted to make a head

    def add_worker(self, worker_id: str) -> None:
        """Start tracking a worker with an empty cache (KVIndex.add_worker)."""
        self._heads[worker_id] = self._owner._new_code(self._pool, worker_id) << 3

    def apply(self, worker_id: str, event: KVEvent) -> bool:
        """Send one event; always True here (a refusal surfaces at the next query)."""
        head, buffer = self._heads[worker_id], self._owner._buffer
        self._owner._answers = None
        if type(event) is BlockStored:
            hashes = event.block_hashes
            if event.parent_hash is None:
                buffer.extend((head | STORED_ROOT, event.event_id, len(hashes)))
            else:
                buffer.extend((head | STORED, event.event_id, event.parent_hash, len(hashes)))
            _append_hashes(buffer, hashes)
        elif type(event) is BlockRemoved:
            buffer.extend((head | REMOVED, event.event_id, len(event.block_hashes)))
            _append_hashes(buffer, event.block_hashes)
        elif type(event) is AllBlocksCleared:
            buffer.extend((head | CLEARED, event.event_id))
        else:
            raise TypeError(f"not a KV event: {event!r}")
        if len(buffer) >= FLUSH_VALUES:
            self._owner._flush()
        return True

    def overlaps(self, block_hashes: list[int]) -> dict[str, int]:
        """KVIndex.overlaps, answered by the helper once it has every event sent before."""
        return self._owner._ask(self._pool, block_hashes)


def _append_hashes(buffer: array, hashes: Sequence[int]) -> None:
    buffer.extend(array("Q", hashes) if len(hashes) >= MIN_ARRAY_COPY else hashes)


class _Helper:
    """The helper process's state: an index per pool, the workers by code, the last query."""

    def __init__(self) -> None:
        self.indexes: list[KVIndex] = []
        self.workers: list[tuple[KVIndex, str]] = []

    def add(self, values: list[int], position: int) -> int:
        pool, num_words = values[position + 1], values[position + 2]
        end = position + 3 + num_words
        worker_id = array("Q", values[position + 3:end]).tobytes().rstrip(b"\0").decode()
        while len(self.indexes) <= pool:
            self.indexes.append(KVIndex())
        self.indexes[pool].add_worker(worker_id)
        self.workers.append((self.indexes[pool], worker_id))
        return end


def serve(conn) -> None:
    """The helper's loop: apply what comes, answer queries, until an empty message arrives."""
    helper = _Helper()
    error: str | None = None
    while message := conn.recv_bytes():
        try:
            values = array("Q", message).tolist()
            position = 0
            while position < len(values):
                position, answers = _apply_one(values, position, helper)
                if answers is not None:
                    conn.send(error if error is not None else answers)
        except Exception as err:  # noqa: BLE001 -- reported to the simulator, which raises
            logger.exception("KV index process")
            error = error or repr(err)
            conn.send(error)  # a query may be waiting on this message


def _apply_one(values: list[int], position: int, helper: _Helper
               ) -> tuple[int, list[dict[str, int]] | None]:
    """Apply the record at `position`; where the next one starts, and a query's answers."""
    head = values[position]
    kind, code = head & 7, head >> 3
    if kind == QUERY:
        end = position + 2 + values[position + 1]
        block_hashes = values[position + 2:end]
        return end, [index.overlaps(block_hashes) for index in helper.indexes]
    if kind == ADD:
        return helper.add(values, position), None
    index, worker_id = helper.workers[code]
    event_id = values[position + 1]
    if kind == CLEARED:
        event, end = AllBlocksCleared(event_id), position + 2
    elif kind == REMOVED:
        end = position + 3 + values[position + 2]
        event = BlockRemoved(event_id, tuple(values[position + 3:end]))
    elif kind == STORED_ROOT:
        end = position + 3 + values[position + 2]
        event = BlockStored(event_id, None, tuple(values[position + 3:end]))
    else:
        end = position + 4 + values[position + 3]
        event = BlockStored(event_id, values[position + 2], tuple(values[position + 4:end]))
    if not index.apply(worker_id, event):
        raise RuntimeError(f"worker {worker_id}: KV event {event_id} out of sequence")
    return end, None
