"""The frontend as one shared server of streamed tokens that takes the streams in turn.

Every token of every request passes through the one frontend process (OpenAI HTTP or gRPC), which
spends CPU on each before its client has it. Per-worker costs (`token_overhead_s`) cannot make a
ceiling that all workers share; this does. On 2x H200 (benchmarks/serving_path_bench.py,
random:llama-3.1-8b, 256 in / 1024 out, 200 in flight) the frontend delivered 13,052 tok/s over HTTP
and 11,061 over gRPC while the GPUs alone would allow about 20k: 76.6 and 90.4 us of frontend wall
time per token at saturation (its CPU time per token is higher, 111 and 130 us, spread over about
1.4 cores).

Why round-robin. The real frontend runs one asyncio task per stream (frontend/openai_api.py,
frontend/pipeline.py, frontend/openai_sse.py), so when it is saturated each stream gets its turn in
rotation: the delay is spread over every token (N streams in flight get a token each every
N x cost, 200 x 76.6 us = 15.3 ms) and a new request's first token waits about one rotation. A
FIFO server with the same cost has the same ceiling but puts the whole backlog in front of each
request's first token: on the run above it simulated TTFT p50 ~2 s and TPOT 10.9 ms, where real
runs measured TPOT p50 13.3 ms, and TTFT p50 238 ms / p90 724 ms with TPOT 26.5 ms at an older
commit whose ceiling was 7.9k tok/s. Taking the streams in turn, the simulator gives the same
throughput (12,431 tok/s), TPOT p50 13.8 ms and TTFT p50 44 ms on that run.

Model. A stream is one request's token list. The frontend serves one token at a time, each taking
`s_per_token`: it takes the stream at the head of its rotation, delivers that stream's oldest
waiting token, and when the token is done, first lets in every token that has reached it by then
and then puts the stream back at the end of the rotation if it still has tokens waiting. A stream
that gets a token while it has none waiting joins the end of the rotation (as a task woken by its
data joins the end of asyncio's ready queue). Tokens reach the frontend one hop after their step
ends; those of one instant are let in in a fixed order: by source rank, then the order bursts were
handed over, then step, then batch order (the same whether decode stretches are collapsed or not).
The server never idles while a token waits, so the instants at which tokens are delivered are those
of a FIFO server with the same arrivals (same throughput and busy time); only which stream gets each
one differs. A stream's own tokens are delivered in the order they came.

Bursts. A source hands the frontend a burst: the end times of consecutive steps and the token lists
of the requests that get one token every step (one step, or a stretch of identical decode steps,
planner/sim_worker.py). A stretch is handed over when it is planned, and the worker's own list of end
times is shared, so a stretch cut short by an operation (`SimWorker.cut_stretch`, which deletes its
tail in place) loses its tail here too. A cut at t removes only steps that end after t.

Lazy, exact serving. Unlike FIFO, when a token is delivered depends on tokens that reach the
frontend after it (another stream's may take a turn first), so it is known only once every token
that arrives before its turn has been handed over. `serve_through(t)` serves every token whose turn
starts no later than t; the caller calls it only when every token that reaches the frontend by t
has been handed over (and, for stretches, none of those steps can be cut). A request's last token
is then delivered (`is_delivered`) or waits; `earliest_last_turn_s` bounds from below when its turn
can start (the rotation as it stands, no further arrivals: arrivals only ever delay a turn), and
the caller checks again then. Tokens are served one at a time in Python; a step that finds the
frontend idle skips the rotation (about 1 us a step on the conversation trace, where most do).
Delivery times are appended to each request's list as they are decided, so a list only ever grows
in time order.

What is not modelled: the frontend's per-request work (tokenizing, routing: `frontend_overhead_s`
in the simulator, a constant delay) does not queue behind tokens, and the frontend hands a prefill
answer over to its decode worker without waiting for the first token's turn.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections import deque
from itertools import repeat
from operator import attrgetter, itemgetter

logger = logging.getLogger(__name__)

_RANK_SEQ = attrgetter("rank", "seq")
_ARRIVAL = itemgetter(0)


class TokenStream:
    """One request's tokens at the frontend: how many wait, and where their delivery times go."""

    __slots__ = ("times_s", "num_waiting", "num_unserved")

    def __init__(self, times_s: list[float]):
        self.times_s = times_s  # the request's own list: delivery times are appended to it
        self.num_waiting = 0    # reached the frontend by the time it is free, turn not yet started
        self.num_unserved = 0   # let in (known to reach it), turn not yet started


class TokenBurst:
    """Consecutive steps of one source; every step streams one token to each stream, in order."""

    __slots__ = ("ends_s", "hop_s", "rank", "seq", "streams", "num_let_in")

    def __init__(self, ends_s: list[float], hop_s: float, rank: int, seq: int,
                 streams: list[TokenStream]):
        self.ends_s = ends_s            # step end times; a token arrives hop_s after its step
        self.hop_s = hop_s
        self.rank = rank                # breaks ties between sources at the same arrival time
        self.seq = seq                  # then the order bursts were handed over
        self.streams = streams
        self.num_let_in = 0             # steps whose tokens are in the frontend's arrival list


class SharedFrontend:
    """One server that delivers streamed tokens `s_per_token` apart, taking the streams in turn."""

    def __init__(self, s_per_token: float):
        if s_per_token <= 0:
            raise ValueError(f"s_per_token must be positive, got {s_per_token}")
        self.s_per_token = s_per_token
        self.free_s = 0.0       # when the token served last is done (the next turn's start)
        self.num_tokens = 0     # served so far
        self._streams: dict[int, TokenStream] = {}  # by id of the request's token list
        self._pending: list[TokenBurst] = []  # with steps not yet in _arrivals
        # Steps that have reached or will reach the frontend, in arrival order, from _next_arrival.
        self._arrivals: list[tuple[float, list[TokenStream]]] = []
        self._next_arrival = 0
        self._last_arrival_s = float("-inf")
        self._rotation: deque[TokenStream] = deque()  # streams with tokens waiting, in turn order
        self._served: TokenStream | None = None  # served last; rejoins the rotation when done
        self._num_bursts = 0

    @property
    def busy_s(self) -> float:
        return self.num_tokens * self.s_per_token

    # ---- public API ----------------------------------------------------------------------------

    def add(self, ends_s: list[float], hop_s: float, rank: int,
            token_lists: list[list[float]]) -> None:
        """Queue a burst. `ends_s` is kept, not copied: a stretch's owner may cut its tail."""
        self._num_bursts += 1
        if ends_s and token_lists:
            streams = [self._stream(times_s) for times_s in token_lists]
            self._pending.append(TokenBurst(ends_s, hop_s, rank, self._num_bursts, streams))

    def serve_through(self, now_s: float) -> None:
        """Serve every token whose turn starts no later than `now_s` (every token reaching the
        frontend by then must have been handed over, and none of their steps may be cut)."""
        self._let_in(now_s)
        self._serve(now_s)

    def serve_all(self) -> None:
        """Serve every queued token (at the end of a run, when no step is to come or to cut)."""
        self.serve_through(float("inf"))

    def is_delivered(self, times_s: list[float]) -> bool:
        """Whether every token of this list that was let in has been served (its time written)."""
        stream = self._streams.get(id(times_s))
        return stream is None or stream.num_unserved == 0

    def earliest_last_turn_s(self, times_s: list[float]) -> float:
        """When the turn of the list's last token let in starts if no other token comes: a lower
        bound, since a token that comes later can only take a turn ahead of it."""
        stream = self._streams[id(times_s)]
        num_left = stream.num_unserved
        assert num_left > 0, "nothing of this stream waits"
        turns = num_left - 1            # its own earlier tokens
        limit = num_left                # a stream ahead of it has a turn in each of its rounds
        for other in self._turn_order():
            if other is stream:
                limit = num_left - 1    # one behind it has a turn in each round but its last
            else:
                turns += min(other.num_unserved, limit)
        return self.free_s + turns * self.s_per_token

    # ---- helpers -------------------------------------------------------------------------------

    def _stream(self, times_s: list[float]) -> TokenStream:
        stream = self._streams.get(id(times_s))
        if stream is None:
            stream = self._streams[id(times_s)] = TokenStream(times_s)
        return stream

    def _turn_order(self) -> list[TokenStream]:
        """The rotation as it will stand at the next turn, if no other token comes: the streams
        waiting, those whose tokens reached the frontend while it served the last one (in their
        order), then the stream it served last if it has tokens left."""
        order = list(self._rotation)
        joined = set(order)
        served = self._served
        for _, streams in self._arrivals[self._next_arrival:]:  # all came by self.free_s
            for stream in streams:
                if stream not in joined and stream is not served:
                    joined.add(stream)
                    order.append(stream)
        if served is not None and served.num_unserved:
            order.append(served)
        return order

    def _let_in(self, until_s: float) -> None:
        """Move the pending steps that reach the frontend by `until_s` to the arrival list."""
        due: list[tuple[float, list[TokenStream]]] = []
        keep = []
        # Gathered by (rank, seq, step), so that a stable sort by arrival breaks ties that way.
        for burst in sorted(self._pending, key=_RANK_SEQ):
            ends_s, hop_s, first = burst.ends_s, burst.hop_s, burst.num_let_in
            if ends_s[-1] + hop_s <= until_s:
                last = len(ends_s)
            else:
                last = bisect_right(ends_s, until_s, first, key=hop_s.__radd__)
                keep.append(burst)
            if last > first:
                streams = burst.streams
                for stream in streams:
                    stream.num_unserved += last - first
                due.extend(zip(map(hop_s.__radd__, ends_s[first:last]), repeat(streams)))
                burst.num_let_in = last
        self._pending = keep
        if due:
            due.sort(key=_ARRIVAL)
            assert due[0][0] >= self._last_arrival_s, "a token was handed over after its turn"
            self._last_arrival_s = due[-1][0]
            self._arrivals.extend(due)

    def _serve(self, until_s: float) -> None:
        """Round-robin, one token at a time, for every turn that starts no later than until_s.

        A step that reaches an idle frontend (after the stream served last has had its turn) and
        is done before the next step arrives is served in batch order without going through the
        rotation: the same turns, fewer operations."""
        arrivals, i = self._arrivals, self._next_arrival
        num_arrivals = len(arrivals)
        rotation, served = self._rotation, self._served
        s_per_token, t = self.s_per_token, self.free_s
        num_served = 0
        while t <= until_s:
            if not rotation and (served is None or not served.num_waiting):  # idle
                if i == num_arrivals:
                    break
                arrival_s, streams = arrivals[i]
                if arrival_s > t or served is None:
                    start_s = arrival_s if arrival_s > t else t
                    done_s = start_s + len(streams) * s_per_token
                    if i + 1 == num_arrivals or arrivals[i + 1][0] > done_s:
                        for turn, stream in enumerate(streams, 1):
                            stream.times_s.append(start_s + turn * s_per_token)
                            stream.num_unserved -= 1
                        t, served = done_s, streams[-1]
                        num_served += len(streams)
                        i += 1
                        continue
            while i < num_arrivals and arrivals[i][0] <= t:
                for stream in arrivals[i][1]:
                    stream.num_waiting += 1
                    if stream.num_waiting == 1 and stream is not served:
                        rotation.append(stream)
                i += 1
            if served is not None:
                if served.num_waiting:
                    rotation.append(served)
                served = None
            if not rotation:
                if i == num_arrivals:
                    break
                t = arrivals[i][0]  # idle until the next token reaches it
                continue
            served = rotation.popleft()
            t += s_per_token
            served.times_s.append(t)
            served.num_waiting -= 1
            served.num_unserved -= 1
            num_served += 1
        self.free_s, self._served = t, served
        self.num_tokens += num_served
        if i > 4096 and 2 * i > num_arrivals:  # drop what has been let in, now and then
            del arrivals[:i]
            i = 0
        self._next_arrival = i
