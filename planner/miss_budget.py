"""One miss budget for both pools: the fewest prefill + decode workers whose misses add up to at
most `1 - attainment` of the requests.

A disaggregated request misses the SLO when its first token comes late (it waited for a prefill
worker, or its prefill alone passes the TTFT bound) or when a gap between its tokens passes the
ITL bound (the first one on its decode worker, after the KV pull, is the longest). The pools' late
shares add; a request late in both is counted twice, which errs on the safe side. On top of them
come the requests that no pool size helps (planner.prefill_queue's unreachable share, the pulls
longer than the ITL bound). Sizing each pool against the whole budget on its own let the sum
pass it: in the simulated hour of benchmarks/planner_sim_bench.py, the twelve intervals served
by 5 prefill + 2 decode workers missed 1.1% of their requests, 0.56% on a late first gap after
the hand-over, about 0.5% whose prefill alone took over 10 s, and 0.05% on a late first token;
each pool was within 1% by itself.

Search: for each prefill size that keeps up, the smallest decode size whose late share fits in
what the prefill pool and the unreachable requests leave; the fewest workers in all win, then the
fewest misses. A pool's sizes are offered only while each added worker takes at least
`MIN_GAIN_FRACTION` of the budget off its late list: when the unreachable requests fill nearly
all of the budget, what is left asks for a late share of almost zero, and the queueing tails
would buy that with worker after worker for a few requests in ten thousand (a test load with 1%
of its prompts unreachable took 7 prefill workers instead of 2 for 0.02% of its requests).
None when no pair fits within the GPU budget (or the unreachable requests alone fill the
budget): then the SLO is out of reach, and the caller sizes each pool on its own budget instead.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_GAIN_FRACTION = 0.1  # of the miss budget: what one more worker must take off the late list


def cheapest_pair(prefill: Sequence[tuple[int, float]], decode: Sequence[tuple[int, float]],
                  budget: float, max_workers: int) -> tuple[int, int] | None:
    """(prefill workers, decode workers) with late shares summing to at most `budget`.

    `prefill` and `decode` are (workers, late share) options in increasing order of workers;
    shares are of all requests.
    """
    best: tuple[tuple[int, float], tuple[int, int]] | None = None
    for num_prefill, prefill_late in prefill:
        for num_decode, decode_late in decode:
            if num_prefill + num_decode > max_workers:
                break
            late = prefill_late + decode_late
            if late <= budget:
                key = (num_prefill + num_decode, late)
                if best is None or key < best[0]:
                    best = (key, (num_prefill, num_decode))
                break  # a larger decode pool only costs more
    return None if best is None else best[1]
