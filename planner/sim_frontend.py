"""The frontend as one shared server of streamed tokens: the serving path's token ceiling.

Every token of every request passes through the one frontend process (OpenAI HTTP or gRPC), which
spends CPU on each before its client has it. Per-worker costs (`token_overhead_s`) cannot make a
ceiling that all workers share; this does. On 2x H200 (benchmarks/serving_path_bench.py,
random:llama-3.1-8b, 256 in / 1024 out, 200 in flight) the frontend delivered 13,052 tok/s over HTTP
and 11,061 over gRPC while the GPUs alone would allow about 20k: 76.6 and 90.4 us of frontend wall
time per token at saturation (its CPU time per token is higher, 111 and 130 us, spread over about
1.4 cores).

Model. The frontend is a single server with one FIFO queue. A token that reaches it at time t (its
step's end plus one RPC hop) reaches its client at max(t, when the frontend finished the token
before it) + `s_per_token`. Tokens are served in the order they reach the frontend: across workers
by arrival time, the tokens of one step in batch order, and a tie between two workers' steps at the
same instant goes to the worker ranked first (a fixed order, so that simulating step by step and
simulating collapsed decode stretches serve the same order).

Bursts. A source hands the frontend a burst: the end times of consecutive steps and the token-time
list of each request that gets one token every step (one step, or a stretch of identical decode
steps, planner/sim_worker.py). A stretch is handed over when it is planned, before its steps have
run, and the worker's own list of end times is shared, so a stretch cut short by an operation
(`SimWorker.cut_stretch`, which deletes the tail of that list in place) loses its tail here too.
The frontend serves lazily: `serve_through(burst)` serves every queued step that reaches it no
later than that burst's last one, and only the caller knows when that is safe (every such step must
have been handed over by then; a cut only removes steps that end after the moment it happens, so
none already served). The due steps of all bursts are sorted once and the FIFO recursion is solved
for them together in numpy (`_serve_steps`), a fraction of a microsecond per step whether or not
the workers' steps interleave; it agrees with serving one token at a time to within rounding
(nanoseconds, an hour into a run). A request's delivery times are written into its list once its burst
is served and closed (no step to come or to cut), so a request's list only ever grows in time order.

What is not modelled: the frontend's per-request work (tokenizing, routing: `frontend_overhead_s`
in the simulator, a constant delay) does not queue behind tokens, and the frontend hands a prefill
answer over to its decode worker without waiting for the first token's turn.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)


class TokenBurst:
    """Consecutive steps of one source; every step streams one token to each list, in order."""

    __slots__ = ("ends_s", "hop_s", "rank", "seq", "token_lists", "starts_s", "num_served",
                 "is_closed")

    def __init__(self, ends_s: list[float], hop_s: float, rank: int, seq: int,
                 token_lists: list[list[float]], is_closed: bool):
        self.ends_s = ends_s            # step end times; a token arrives hop_s after its step
        self.hop_s = hop_s
        self.rank = rank                # breaks ties between sources at the same arrival time
        self.seq = seq                  # then the order bursts were handed over
        self.token_lists: list[list[float]] | None = token_lists  # None once written
        self.starts_s: list[float] = []  # when the frontend began each served step's tokens
        self.num_served = 0
        self.is_closed = is_closed      # no step will be added or cut


class SharedFrontend:
    """One FIFO server that delivers each streamed token after `s_per_token` of its time."""

    def __init__(self, s_per_token: float):
        if s_per_token <= 0:
            raise ValueError(f"s_per_token must be positive, got {s_per_token}")
        self.s_per_token = s_per_token
        self.free_s = 0.0       # when the frontend is done with every token served so far
        self.num_tokens = 0     # served so far
        self._pending: list[TokenBurst] = []  # with steps to serve, or times to write
        self._num_bursts = 0

    @property
    def busy_s(self) -> float:
        return self.num_tokens * self.s_per_token

    # ---- public API ----------------------------------------------------------------------------

    def add(self, ends_s: list[float], hop_s: float, rank: int,
            token_lists: list[list[float]], is_closed: bool = True) -> TokenBurst:
        """Queue a burst. `ends_s` is kept, not copied: a stretch's owner may cut its tail."""
        self._num_bursts += 1
        burst = TokenBurst(ends_s, hop_s, rank, self._num_bursts, token_lists, is_closed)
        if ends_s and token_lists:
            self._pending.append(burst)
        else:
            burst.token_lists = None  # nothing to deliver
        return burst

    def close(self, burst: TokenBurst) -> None:
        """The burst's steps are final (its stretch has ended)."""
        burst.is_closed = True
        if burst.token_lists is not None and burst.num_served >= len(burst.ends_s):
            self._write(burst)

    def serve_through(self, burst: TokenBurst) -> None:
        """Serve in arrival order up to and including the burst's last step; write its times."""
        if burst.token_lists is None:
            return
        if burst.num_served < len(burst.ends_s):
            key = (burst.ends_s[-1] + burst.hop_s, burst.rank, burst.seq)
            self._serve(lambda b: _num_due(b, key))
        if burst.token_lists is not None and burst.is_closed:
            self._write(burst)

    def serve_all(self) -> None:
        """Serve every queued step (at the end of a run, when every burst is closed)."""
        self._serve(lambda b: len(b.ends_s))

    # ---- helpers -------------------------------------------------------------------------------

    def _serve(self, num_due: Callable[[TokenBurst], int]) -> None:
        """Serve each pending burst's steps up to `num_due(burst)`, all of them in arrival order.

        The FIFO recursion start_n = max(arrival_n, done_(n-1)), done_n = start_n + cost_n is
        solved for all due steps at once: done_n = S_n + max(free, max_(j<=n) arrival_j - S_(j-1))
        with S the running sum of the costs (Lindley's recursion, unrolled).
        """
        bursts, ends, counts = [], [], []
        for burst in self._pending:
            k, n = burst.num_served, num_due(burst)
            if n > k:
                bursts.append(burst)
                ends.extend(burst.ends_s[k:n])
                counts.append(n - k)
        if bursts:
            self._serve_steps(bursts, ends, counts)
        self._pending = [b for b in self._pending if b.token_lists is not None]

    def _serve_steps(self, bursts: list[TokenBurst], ends: list[float], counts: list[int]
                     ) -> None:
        arrival_s = np.array(ends) + np.repeat([b.hop_s for b in bursts], counts)
        cost_s = np.repeat([self.s_per_token * len(b.token_lists) for b in bursts], counts)
        # Arrival order; ties by rank, then burst; a burst's steps stay in their order.
        order = np.lexsort((np.arange(len(ends)), np.repeat([b.seq for b in bursts], counts),
                            np.repeat([b.rank for b in bursts], counts), arrival_s))
        arrival_s, cost_s = arrival_s[order], cost_s[order]
        sum_s = np.cumsum(cost_s)
        sum_before_s = np.concatenate(([0.0], sum_s[:-1]))
        done_s = sum_s + np.maximum(np.maximum.accumulate(arrival_s - sum_before_s),
                                    self.free_s)
        starts_s = np.maximum(arrival_s, np.concatenate(([self.free_s], done_s[:-1])))
        in_burst_order = np.empty_like(starts_s)
        in_burst_order[order] = starts_s
        starts = in_burst_order.tolist()
        self.free_s = float(done_s[-1])
        first = 0
        for burst, count in zip(bursts, counts):
            burst.starts_s.extend(starts[first:first + count])
            first += count
            burst.num_served += count
            self.num_tokens += count * len(burst.token_lists)
            if burst.is_closed and burst.num_served >= len(burst.ends_s):
                self._write(burst)

    def _write(self, burst: TokenBurst) -> None:
        """Each request's delivery times: its token is the i-th of each step the frontend serves."""
        starts_s = burst.starts_s
        assert len(starts_s) == len(burst.ends_s), "a step was served before it was cut"
        s_per_token = self.s_per_token
        if len(starts_s) == 1:
            start_s = starts_s[0]
            for i, times_s in enumerate(burst.token_lists, 1):
                times_s.append(start_s + i * s_per_token)
        else:
            for i, times_s in enumerate(burst.token_lists, 1):
                times_s.extend(map((i * s_per_token).__add__, starts_s))
        burst.token_lists = None
        burst.starts_s = []


def _num_due(burst: TokenBurst, key: tuple[float, int, int]) -> int:
    """How many of the burst's steps reach the frontend no later than `key` (arrival, rank, seq)."""
    ends_s, hop_s = burst.ends_s, burst.hop_s
    arrival_s = key[0]
    if ends_s[-1] + hop_s < arrival_s:
        return len(ends_s)
    # A step arriving exactly at `key`'s instant comes before it if its burst ranks first.
    find = bisect_right if (burst.rank, burst.seq) <= key[1:] else bisect_left
    return find(ends_s, arrival_s, burst.num_served, key=hop_s.__radd__)
