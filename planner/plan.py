"""`tandem plan`'s search: which deployment shape serves a workload best under an SLO.

For N GPUs the shapes are: N aggregated workers (each prefills its own prompts), and every split
into P prefill and N - P decode workers. Knobs per shape: the remote-prefill threshold (split
shapes only; aggregated ones never prefill remotely) and the step token budget
(`max_num_batched_tokens`, the chunk size of chunked prefill).

Goodput, DistServe's definition: the highest request rate at which at least `attainment` of the
requests meet the SLO. A request meets it as `tandem bench --slo` judges it
(tandem.bench.metrics.meets_slo): TTFT <= ttft_ms and its worst inter-token gap <= itl_ms (every
gap, not the mean TPOT; tpot_ms and e2e_ms bounds apply too when given). A failed request fails.
The rate is found by doubling from a start until attainment drops below the target, then
bisecting. A probe at rate r simulates `r x probe_duration_s` requests (at least `min_requests`,
at most `max_requests`) and judges attainment on all but the first `warmup_fraction` of them: the
system has to fill up before it shows its steady state. A fixed handful of requests would not: at
a decode-heavy workload's knee, 200 requests with 1,024-token outputs all run at once as a burst
that never reaches the steady concurrency (rate x latency) and pass at any rate. A capped probe
still under-states queueing for rates above `max_requests / probe_duration_s`. A probe whose
requests in flight grow through it (`keeps_up`) is past the shape's capacity and counts as 0: its
backlog would grow without bound, even when the probe ends before the SLO shows it.

Shapes are ranked by goodput per GPU. The fewest GPUs that meet the SLO at the requested rate are
found by bisection over the GPU count (assuming more GPUs never hurt), each count judged by its
best shape at that rate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

from tandem.bench.arrivals import gamma_arrival_offsets_s
from tandem.bench.metrics import meets_slo
from tandem.bench.records import BenchRequest
from tandem.planner.sim_config import SimConfig
from tandem.planner.simulator import Simulator

logger = logging.getLogger(__name__)

MAX_PROBE_REQUESTS = 2000  # per probe: seconds to a minute of simulation on a CPU
PROBE_DURATION_S = 60.0    # of arrivals per probe: many latencies long, so queues can build
BACKLOG_NOISE_SIGMAS = 3.0  # growth of the requests in flight beyond this is a backlog, not noise


@dataclass(frozen=True, slots=True)
class Shape:
    num_prefill: int
    num_decode: int
    remote_prefill_min_tokens: int
    max_num_batched_tokens: int

    @property
    def num_gpus(self) -> int:
        return self.num_prefill + self.num_decode

    @property
    def name(self) -> str:
        layout = (f"{self.num_decode} aggregated" if self.num_prefill == 0
                  else f"{self.num_prefill}P:{self.num_decode}D min{self.remote_prefill_min_tokens}")
        return f"{layout} chunk{self.max_num_batched_tokens}"


@dataclass(slots=True)
class ShapeResult:
    shape: Shape
    goodput_rps: float
    probes: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment)

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput_rps / self.shape.num_gpus

    def to_json_dict(self) -> dict:
        return {**asdict(self.shape), "name": self.shape.name, "num_gpus": self.shape.num_gpus,
                "goodput_rps": self.goodput_rps, "goodput_per_gpu": self.goodput_per_gpu,
                "probes": [{"rate_rps": r, "attainment": a} for r, a in sorted(self.probes)]}


@dataclass(frozen=True, slots=True)
class PlanSearch:
    slo: dict[str, float]
    attainment: float = 0.9
    max_requests: int = MAX_PROBE_REQUESTS
    min_requests: int = 100
    probe_duration_s: float = PROBE_DURATION_S
    warmup_fraction: float = 0.2      # the first requests find an empty system: not judged
    seed: int = 0
    burstiness: float = 1.0
    bisect_steps: int = 6
    max_doublings: int = 14

    def __post_init__(self) -> None:
        if not self.slo:
            raise ValueError("--slo needs at least one bound, e.g. ttft_ms=1000 itl_ms=40")
        if not 0.0 < self.attainment <= 1.0:
            raise ValueError(f"--attainment must be in (0, 1], got {self.attainment}")
        if self.min_requests < 1 or self.max_requests < 1:
            raise ValueError(f"probes need at least 1 request, got min {self.min_requests} "
                             f"and max {self.max_requests}")
        if not 0.0 <= self.warmup_fraction < 1.0 or self.probe_duration_s <= 0:
            raise ValueError("need 0 <= warmup_fraction < 1 and probe_duration_s > 0")


def shapes_for(num_gpus: int, thresholds: Sequence[int], chunk_sizes: Sequence[int]
               ) -> list[Shape]:
    """Aggregated, then every prefill:decode split, each with every knob value."""
    if num_gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {num_gpus}")
    shapes = [Shape(0, num_gpus, thresholds[0], c) for c in chunk_sizes]
    for num_prefill in range(1, num_gpus):
        shapes += [Shape(num_prefill, num_gpus - num_prefill, t, c)
                   for t in thresholds for c in chunk_sizes]
    return shapes


class Planner:
    """Probes shapes at request rates with the simulator; caches every probe."""

    def __init__(self, base: SimConfig, model, requests: Sequence[BenchRequest],
                 search: PlanSearch):
        self.base = base
        self.model = model
        self.requests = list(requests[:search.max_requests])
        if not self.requests:
            raise ValueError("the workload has no requests")
        self.search = search
        self._recorded = all(r.arrival_offset_s is not None for r in self.requests)
        self._cache: dict[tuple[Shape, float], float] = {}
        self._misses_alone: set[Shape] = set()   # shapes whose requests miss with none beside

    def config_for(self, shape: Shape) -> SimConfig:
        engine = replace(self.base.engine, max_num_batched_tokens=shape.max_num_batched_tokens)
        routing = replace(self.base.routing,
                          remote_prefill_min_tokens=shape.remote_prefill_min_tokens)
        return replace(self.base, num_prefill=shape.num_prefill, num_decode=shape.num_decode,
                       engine=engine, routing=routing)

    def attainment(self, shape: Shape, rate_rps: float) -> float:
        key = (shape, rate_rps)
        if key not in self._cache:
            requests = self._probe_requests(rate_rps)
            result = Simulator(self.config_for(shape), self.model).run(
                requests, self._offsets_s(rate_rps, len(requests)))
            records = sorted(result.records(), key=lambda r: r.start_s)
            attained = judged_attainment(records, self.search.slo, self.search.warmup_fraction)
            if attained < self.search.attainment and one_at_a_time(records):
                self._misses_alone.add(shape)   # a lower rate cannot change any request
            if not self._recorded and not keeps_up(records):
                logger.info("%s at %.2f req/s does not keep up: its backlog grows through the "
                            "probe (%.0f%% within the SLO so far)", shape.name, rate_rps,
                            100 * attained)
                attained = 0.0
            self._cache[key] = attained
        return self._cache[key]

    def _probe_requests(self, rate_rps: float) -> list[BenchRequest]:
        if self._recorded:  # a trace keeps its own requests and arrival pattern
            return self.requests
        search = self.search
        wanted = math.ceil(rate_rps * search.probe_duration_s) if math.isfinite(rate_rps) \
            else search.max_requests
        return self.requests[:min(max(search.min_requests, wanted), search.max_requests)]

    def goodput(self, shape: Shape, start_rps: float) -> ShapeResult:
        target = self.search.attainment
        holds = lambda rate: self.attainment(shape, rate) >= target  # noqa: E731
        low, high = _bracket(holds, start_rps, self.search.max_doublings,
                             lambda: shape in self._misses_alone)
        for _ in range(self.search.bisect_steps if high > low else 0):
            middle = (low + high) / 2
            low, high = (middle, high) if holds(middle) else (low, middle)
        probes = [(rate, a) for (s, rate), a in self._cache.items() if s == shape]
        return ShapeResult(shape, low, probes)

    def best_at(self, shapes: Sequence[Shape], rate_rps: float) -> tuple[Shape, float]:
        """The shape with the highest attainment at one rate."""
        scored = [(self.attainment(shape, rate_rps), -i, shape) for i, shape in enumerate(shapes)]
        attainment, _, shape = max(scored)
        return shape, attainment

    def _offsets_s(self, rate_rps: float, num_requests: int) -> list[float]:
        if self._recorded:  # a trace: keep its arrival pattern, scaled to the rate
            offsets = [float(r.arrival_offset_s) for r in self.requests]
            span_s = max(offsets) - min(offsets)
            native_rps = (len(offsets) - 1) / span_s if span_s > 0 else math.inf
            scale = native_rps / rate_rps if math.isfinite(native_rps) else 0.0
            return [(o - offsets[0]) * scale for o in offsets]
        return gamma_arrival_offsets_s(num_requests, rate_rps, self.search.burstiness,
                                       self.search.seed)


def judged_attainment(records, slo: dict[str, float], warmup_fraction: float) -> float:
    """The share of a probe's requests (RequestRecords in order of sending) within the SLO, all
    but the first warmup_fraction of them judged."""
    judged = records[int(len(records) * warmup_fraction):] or records
    return sum(meets_slo(r, slo) for r in judged) / len(judged)


def keeps_up(records) -> bool:
    """Whether the requests in the system stop growing over a probe of steady arrivals.

    A shape past its capacity builds a backlog for as long as arrivals last, but a probe may end
    before the backlog shows in the SLO: a frontend that takes streams in turn spreads an overload
    over every stream's pace a little at a time. The mean number of requests in flight over the
    second quarter of the arrivals and over the last quarter: a stable shape's differ by noise
    (taken as sqrt(L)); an overloaded one has gained (rate - capacity) x half the probe. Its
    steady-state attainment is then 0. Means over windows, not counts at two instants: at a few
    requests in flight an instant often finds none, which read a stable probe as a backlog.
    """
    last_s = max(r.start_s for r in records)
    spans = [(r.start_s, r.start_s + r.e2e_ms / 1e3) for r in records]

    def mean_in_flight(since_s: float, until_s: float) -> float:
        if until_s <= since_s:
            return float(sum(1 for start, end in spans if start <= since_s < end))
        busy = sum(max(0.0, min(end, until_s) - max(start, since_s)) for start, end in spans)
        return busy / (until_s - since_s)

    early = mean_in_flight(last_s / 4, last_s / 2)
    late = mean_in_flight(3 * last_s / 4, last_s)
    return late - early <= BACKLOG_NOISE_SIGMAS * math.sqrt(max(early, 1.0)) + 1


def one_at_a_time(records) -> bool:
    """Whether each request of a probe ended before the next one came: then every latency is
    that of a request alone, and no lower rate can change it."""
    ordered = sorted(records, key=lambda r: r.start_s)
    return all(later.start_s >= earlier.start_s + (earlier.e2e_ms or 0.0) / 1e3
               for earlier, later in zip(ordered, ordered[1:]))


def fewest_gpus(meets: Callable[[int], bool], max_gpus: int) -> int | None:
    """Smallest n in [1, max_gpus] with meets(n), by bisection (meets assumed monotone)."""
    if not meets(max_gpus):
        return None
    low, high = 0, max_gpus  # meets(high) holds; meets(low) is taken to fail
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if meets(middle) else (middle, high)
    return high


def _bracket(holds: Callable[[float], bool], start_rps: float, max_doublings: int,
             hopeless: Callable[[], bool] = lambda: False) -> tuple[float, float]:
    """(a rate that holds or 0, a rate that fails) around the knee; the search down stops once
    `hopeless()` says no lower rate can hold."""
    rate = start_rps
    if holds(rate):
        for _ in range(max_doublings):
            if not holds(rate * 2):
                return rate, rate * 2
            rate *= 2
        return rate, rate  # never failed: report the highest rate tried
    for _ in range(max_doublings):
        if hopeless():
            break
        if holds(rate / 2):
            return rate / 2, rate
        rate /= 2
    return 0.0, rate
