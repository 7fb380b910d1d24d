"""Performance model: the time of any engine step, predicted from a measured profile.

`tandem profile` (planner/profile.py) measures step times on a grid; this module turns those points
into a predictor. The simulator calls it for every simulated step, hundreds of thousands of times
a run, so a prediction is a few bisections and multiply-adds over small sorted Python lists: no
torch, no grpc, no numpy on the prediction path (numpy only fits the mixed-step regression).

The form follows what each step is bound by:

- Prefill (new tokens N, cached tokens C): one curve over N per measured C, piecewise linear in
  log N / log t, because the time is flat while reading the weights dominates and then grows with N
  (a knee that log-log interpolation follows on a power-of-two grid). Between two C curves the time
  is interpolated linearly in C at the same N: attention over the cached prefix adds N * C work.
- Decode (batch B, total context K): one curve over K per measured B, linear in K (the KV bytes
  read grow linearly), and linear in B between curves at the same K. A decode step runs as the
  CUDA graph of the next captured batch size (17 sequences as 32, engine/step_buckets.py), so a
  profile measured with graphs prices it at that batch.
- Mixed (a prefill chunk of N tokens after C cached, beside a decode batch of B sequences holding
  K context tokens, as chunked prefill runs them): one eager forward pass, so a regression over
  what it computes, a + b * (N + B) + c * N * (C + N / 2) + d * B + e * K (tokens through the
  weights, prefill attention, per-sequence work, the decode rows' KV read), fitted by least
  squares on relative error with non-negative slopes. It is fitted on the mixed points alone:
  eager steps are host-bound and noisy at small sizes, and leaning on the prefill curves carried
  their noise into every mixed prediction (twice the held-back error on the H200 profiles). It is
  never below the pure decode step of the same batch. Past the longest prefix among the mixed
  points, the prefix's further cost comes from the prefill curves, measured much further.
- Transfer (bytes): piecewise linear in bytes (latency plus bytes over bandwidth), or a given link
  (`with_transfer_link`) where the profile has no points or the question is another interconnect.

Steps that are not decode-only run as captured graphs padded to a bucket of token counts
(engine/step_buckets.py) up to the engine's step budget. A profile records the limit it was measured
with (`step_graph_max_tokens`); its points are read at their padded row counts, and a step is priced
at the rows it would pad to under the step budget it is served with. A 2048-token chunk beside 8
decodes ran as 2304 rows under the profiler's 8192-token budget, but as exactly 2048 under a
2048-token serving budget.

Outside the grid, the end segments extend, with slopes clamped at zero so that more work is never
predicted to be faster; a curve left with one point takes its slope from the nearest curve.
`holdout_error` reports how well this predicts profile points it was not fitted on. What serving
adds to these bare steps is fitted from real runs in planner/serving_fit.py.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from bisect import bisect_right
from typing import Iterable

import numpy as np

from tandem.engine.step_buckets import MAX_DECODE_BATCH, MAX_TOKENS, padded_batch, padded_tokens

logger = logging.getLogger(__name__)

KINDS = ("prefill", "decode", "mixed", "transfer")


class Curve:
    """t(x) through measured (x, t) points, piecewise linear in x or in (log x, log t)."""

    __slots__ = ("xs", "ys", "log_log", "tail_slope", "_arrays")

    def __init__(self, points: Iterable[tuple[float, float]], log_log: bool):
        merged: dict[float, list[float]] = {}
        for x, t in points:
            merged.setdefault(float(x), []).append(float(t))
        xs = sorted(merged)
        # Repeated x: their mean. No monotone smoothing: pooling non-monotone neighbours (pool
        # adjacent violators) raised the held-back error on all four H200 profiles.
        ys = [sum(merged[x]) / len(merged[x]) for x in xs]
        self.log_log = log_log
        if log_log:
            xs = [math.log(max(x, 1.0)) for x in xs]
            ys = [math.log(max(y, 1e-12)) for y in ys]
        self.xs, self.ys = xs, ys
        # Past the last knot: this slope from it (None: the last segment's). Set by a CurveFamily
        # from a neighbour measured further out.
        self.tail_slope: float | None = None
        self._arrays: tuple | None = None  # many()'s knots and slopes, made at its first call

    def last_slope(self) -> float:
        """The slope of the last segment, in the curve's own space."""
        xs, ys = self.xs, self.ys
        return (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0

    def slope_at(self, x: float) -> float:
        """The slope of the segment over x, in the curve's own space (log-log or linear)."""
        xs, ys = self.xs, self.ys
        if len(xs) < 2:
            return 0.0
        x = (math.log(x) if x > 1.0 else 0.0) if self.log_log else x
        i = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
        return (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])

    def borrow_slope(self, donor: "Curve") -> None:
        """A one-point curve takes its slope from a neighbour instead of staying flat."""
        x0, y0 = self.xs[0], self.ys[0]
        raw_x = math.exp(x0) if self.log_log else x0
        self.xs, self.ys = [x0, x0 + 1.0], [y0, y0 + max(donor.slope_at(raw_x), 0.0)]
        self._arrays = None

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if self.log_log:
            x = math.log(x) if x > 1.0 else 0.0
        n = len(xs)
        if n == 1:
            y = ys[0]
        else:
            i = bisect_right(xs, x) - 1
            if i > n - 2:  # at or past the last knot: from it, at the tail's slope
                x0, y0 = xs[-1], ys[-1]
                slope = self.last_slope() if self.tail_slope is None else self.tail_slope
            else:
                i = 0 if i < 0 else i
                x0, y0 = xs[i], ys[i]
                slope = (ys[i + 1] - y0) / (xs[i + 1] - x0)
            if slope < 0.0 and (x < xs[0] or x > xs[-1]):
                slope = 0.0  # never extrapolate a falling time
            y = y0 + slope * (x - x0)
        return math.exp(y) if self.log_log else max(y, 0.0)

    def many(self, xs: np.ndarray) -> np.ndarray:
        """`self(x)` for each of xs, with the same float operations (so the same values).

        A simulated decode stretch prices its steps here, tens of thousands of calls a run, each
        of a few hundred points: numpy's per-call overhead is most of the cost, so the segment
        slopes (the same division __call__ makes) are made once and a call makes few passes.
        """
        x = xs.astype(np.float64)
        if self.log_log:
            x = np.where(x > 1.0, np.log(np.maximum(x, 1.0)), 0.0)
        if len(self.xs) == 1:
            y = np.full_like(x, self.ys[0])
        else:
            knots, inner_knots, values, slopes, has_falling = self._arrays or self._make_arrays()
            # Bisecting all knots but the first gives __call__'s segment: before the second knot
            # the first segment, from the last knot on the tail.
            i = np.searchsorted(inner_knots, x, side="right")
            slope = slopes[i]
            if has_falling:  # a falling segment is flat outside the knots, as in __call__
                slope = np.where((slope < 0.0) & ((x < knots[0]) | (x > knots[-1])), 0.0, slope)
            y = values[i] + slope * (x - knots[i])
        return np.exp(y) if self.log_log else np.maximum(y, 0.0)

    def _make_arrays(self) -> tuple:
        """(knots, knots past the first, values, segment slopes and the tail's, whether a slope
        is negative)."""
        knots, values = np.asarray(self.xs), np.asarray(self.ys)
        with np.errstate(divide="ignore", invalid="ignore"):  # equal knots: a segment none reads
            slopes = (values[1:] - values[:-1]) / (knots[1:] - knots[:-1])
        tail = self.last_slope() if self.tail_slope is None else self.tail_slope
        slopes = np.append(slopes, tail)
        self._arrays = (knots, knots[1:], values, slopes, bool((slopes < 0.0).any()))
        return self._arrays


class CurveFamily:
    """Curves over one axis, one per value of a second axis, interpolated linearly across it."""

    __slots__ = ("keys", "curves")

    def __init__(self, rows: Iterable[tuple[float, float, float]], log_log: bool):
        by_key: dict[float, list[tuple[float, float]]] = {}
        for key, x, t in rows:
            by_key.setdefault(float(key), []).append((x, t))
        self.keys = sorted(by_key)
        self.curves = [Curve(by_key[k], log_log) for k in self.keys]
        donors = [(k, c) for k, c in zip(self.keys, self.curves) if len(c.xs) > 1]
        for key, curve in zip(self.keys, self.curves):
            further = [(k, c) for k, c in donors if c.xs[-1] > curve.xs[-1]]
            if len(curve.xs) > 1 and further and not log_log:
                # Past its last point a linear curve runs at the far slope of the nearest curve
                # measured further out, not at its own last segment's, which its short x make
                # steeper (decode: a step's time per context token falls towards the KV read's as
                # contexts grow, the same bytes a token at every batch size). A log-log curve's
                # slope is an exponent, which does not carry over between curves so.
                curve.tail_slope = min(further, key=lambda d: abs(d[0] - key))[1].last_slope()
            elif len(curve.xs) == 1 and donors:
                curve.borrow_slope(min(donors, key=lambda d: abs(d[0] - key))[1])

    def __call__(self, key: float, x: float) -> float:
        keys, curves = self.keys, self.curves
        n = len(keys)
        if n == 1:
            return curves[0](x)
        i = bisect_right(keys, key) - 1
        i = 0 if i < 0 else (n - 2 if i > n - 2 else i)
        t0, t1 = curves[i](x), curves[i + 1](x)
        slope = (t1 - t0) / (keys[i + 1] - keys[i])
        if slope < 0.0 and (key < keys[0] or key > keys[-1]):
            slope = 0.0
        return max(t0 + slope * (key - keys[i]), 0.0)

    def many(self, key: float, xs: np.ndarray) -> np.ndarray:
        """`self(key, x)` for each of xs, with the same float operations."""
        keys, curves = self.keys, self.curves
        n = len(keys)
        if n == 1:
            return curves[0].many(xs)
        i = bisect_right(keys, key) - 1
        i = 0 if i < 0 else (n - 2 if i > n - 2 else i)
        t0, t1 = curves[i].many(xs), curves[i + 1].many(xs)
        slope = (t1 - t0) / (keys[i + 1] - keys[i])
        if key < keys[0] or key > keys[-1]:
            slope = np.where(slope < 0.0, 0.0, slope)
        return np.maximum(t0 + slope * (key - keys[i]), 0.0)


class PerfModel:
    """Step and transfer times, in seconds, for one model on one device."""

    def __init__(self, block_size: int, kv_bytes_per_token: int, prefill: CurveFamily,
                 decode: CurveFamily, mixed_coef: tuple[float, ...] | None,
                 transfer: Curve | None, meta: dict | None = None,
                 graph_tokens: int | None = None, mixed_max_cached: int = 0,
                 decode_graph_batch: int | None = None):
        self.block_size = block_size
        self.graph_tokens = graph_tokens  # the profile's step-graph limit; None: measured eager
        # Decode steps of up to this many sequences ran as the next captured batch size
        # (engine/step_buckets.py): a batch of 17 as one of 32, whose point the profile measured.
        # None: decode steps ran eagerly, at their own size.
        self.decode_graph_batch = decode_graph_batch
        self.kv_bytes_per_token = kv_bytes_per_token
        self._prefill = prefill
        self._decode = decode
        # None: too few mixed points; then a mixed step is its prefill plus the decode rows' KV read
        self._mixed = mixed_coef
        # The longest prefix among the mixed points. A chunk after a longer one is priced by the
        # fit at this prefix plus what the prefill curves (measured to far longer prefixes) add
        # for the rest: the fit is linear in the prefix, and attention over a long prefix is not
        # (on an H200, extrapolated from prefixes of 0 and 4096 tokens it charged a 2048-token
        # chunk after 16k-28k tokens 11-22% too much; benchmarks/RESULTS.md).
        self._mixed_max_cached = mixed_max_cached
        self._transfer = transfer
        self.meta = meta or {}

    @classmethod
    def from_profile(cls, profile: dict) -> "PerfModel":
        if not profile.get("prefill") or not profile.get("decode"):
            raise ValueError("the profile needs prefill and decode points; "
                             "rerun `tandem profile` to measure them")
        engine = profile.get("engine") or {}
        graph_tokens = engine.get("step_graph_max_tokens")
        decode_graph_batch = engine.get("decode_graph_max_batch")
        if decode_graph_batch is None and engine.get("cuda_graphs"):   # profiles before the key
            decode_graph_batch = min(int(engine.get("max_num_seqs") or MAX_DECODE_BATCH),
                                     MAX_DECODE_BATCH)
        prefill = CurveFamily(((p["num_cached_tokens"],
                                _padded_rows(p["num_new_tokens"], graph_tokens), p["seconds"])
                               for p in profile["prefill"]), log_log=True)
        decode = CurveFamily(((p["batch_size"], p["num_context_tokens"], p["seconds"])
                              for p in profile["decode"]), log_log=False)
        mixed_points = profile.get("mixed") or []
        mixed = fit_mixed(mixed_points, graph_tokens)
        mixed_max_cached = max((p["num_prefill_cached_tokens"] for p in mixed_points), default=0)
        points = (profile.get("transfer") or {}).get("points") or []
        transfer = Curve(((p["num_bytes"], p["seconds"]) for p in points), log_log=False) \
            if points else None
        meta = {k: profile.get(k) for k in ("model", "device_name", "date", "tandem_version")}
        return cls(int(profile["block_size"]), int(profile["kv_bytes_per_token"]), prefill,
                   decode, mixed, transfer, meta, graph_tokens, mixed_max_cached,
                   decode_graph_batch)

    @classmethod
    def load(cls, path: str) -> "PerfModel":
        with open(path) as f:
            return cls.from_profile(json.load(f))

    def prefill_s(self, num_new_tokens: int, num_cached_tokens: int = 0,
                  step_budget: int | None = None) -> float:
        """step_budget: the serving engine's max_num_batched_tokens (None: the profile's own)."""
        if num_new_tokens <= 0:
            return 0.0
        return self._prefill(num_cached_tokens, self._rows(num_new_tokens, step_budget))

    def _rows(self, num_tokens: int, step_budget: int | None) -> int:
        """The rows a step of num_tokens computes when served with step_budget."""
        limit = self.graph_tokens
        if limit is not None and step_budget is not None:
            limit = min(step_budget, MAX_TOKENS)
        return _padded_rows(num_tokens, limit)

    def decode_s(self, batch_size: int, num_context_tokens: int) -> float:
        """One decode step of the whole batch; num_context_tokens sums the batch's contexts."""
        if batch_size <= 0:
            return 0.0
        return self._decode(self._graph_batch(batch_size), num_context_tokens)

    def _graph_batch(self, batch_size: int) -> int:
        """The batch a decode step of batch_size runs as (its own where graphs were off)."""
        limit = self.decode_graph_batch
        return batch_size if limit is None else padded_batch(batch_size, limit)

    def decode_steps_s(self, batch_size: int, first_context_tokens: int, num_steps: int
                       ) -> list[float]:
        """decode_s of num_steps steps of one batch, its context growing by batch_size a step.

        The simulator times a stretch of identical decode steps this way, in one numpy pass.
        """
        if batch_size <= 0:
            return [0.0] * num_steps
        contexts = first_context_tokens + batch_size * np.arange(num_steps, dtype=np.int64)
        return self._decode.many(self._graph_batch(batch_size), contexts).tolist()

    def step_s(self, num_prefill_tokens: int, num_prefill_cached_tokens: int,
               num_decode_seqs: int, num_decode_context_tokens: int,
               step_budget: int | None = None) -> float:
        """Any step: pure prefill, pure decode, or a prefill chunk beside a decode batch."""
        if num_decode_seqs <= 0:
            return self.prefill_s(num_prefill_tokens, num_prefill_cached_tokens, step_budget)
        if num_prefill_tokens <= 0:
            return self.decode_s(num_decode_seqs, num_decode_context_tokens)
        # A mixed step runs as token-count pieces (engine/step_graphs.py), not a decode graph.
        decode = self._decode(num_decode_seqs, num_decode_context_tokens)
        n, b = num_prefill_tokens, num_decode_seqs
        rows = self._rows(n + b, step_budget)
        if self._mixed is None:  # noisy decode curves can make this difference negative
            return max(self._prefill(num_prefill_cached_tokens, rows)
                       + decode - self._decode(b, b), decode)
        a, per_token, per_attn, per_seq, per_context = self._mixed
        cached = num_prefill_cached_tokens
        fitted = min(cached, self._mixed_max_cached)
        t = (a + per_token * rows + per_attn * n * (fitted + 0.5 * n)
             + per_seq * b + per_context * num_decode_context_tokens)
        if cached > fitted:
            t += (self.prefill_s(n, cached, step_budget)
                  - self.prefill_s(n, fitted, step_budget))
        return t if t > decode else decode

    NO_TRANSFER = ("this profile holds no KV transfer points (measured with one device): give "
                   "the link between the workers (`--transfer-gbps`)")

    @property
    def has_transfer(self) -> bool:
        """Whether KV transfers can be priced: measured points, or a link."""
        return self._transfer is not None

    def transfer_s(self, num_bytes: int) -> float:
        if num_bytes <= 0:
            return 0.0
        if self._transfer is None:
            raise ValueError(self.NO_TRANSFER)
        return self._transfer(num_bytes)

    def with_transfer_link(self, bytes_per_s: float, latency_s: float) -> "PerfModel":
        """This model with KV transfers priced on a link instead of the profile's points:
        latency_s + bytes / bytes_per_s a transfer. For a profile measured on one device, or to
        ask what another interconnect (RDMA between nodes, say) would do to a deployment."""
        if bytes_per_s <= 0 or latency_s < 0:
            raise ValueError(f"a link needs a positive bandwidth and a latency >= 0, got "
                             f"{bytes_per_s:g} B/s and {latency_s:g} s")
        model = copy.copy(self)
        far = 1e12   # a line through two points: the curve extends it both ways
        model._transfer = Curve([(0.0, latency_s), (far, latency_s + far / bytes_per_s)],
                                log_log=False)
        return model


def _padded_rows(num_tokens: int, graph_tokens: int | None) -> int:
    """The rows a step of num_tokens runs as when steps up to graph_tokens are captured (None:
    none are, every step runs eagerly at its own rows)."""
    return num_tokens if graph_tokens is None else padded_tokens(num_tokens, graph_tokens)


def _mixed_features(p: dict, graph_tokens: int | None) -> list[float]:
    n, c = p["num_prefill_tokens"], p["num_prefill_cached_tokens"]
    b, k = p["num_decode_seqs"], p["num_decode_context_tokens"]
    return [1.0, _padded_rows(n + b, graph_tokens), n * (c + 0.5 * n), b, k]


def fit_mixed(points: list[dict], graph_tokens: int | None = None) -> tuple[float, ...] | None:
    """(a_s, per token, per attention pair, per decode seq, per context token), or None; the
    token feature is the rows each point ran as (graph_tokens: the profile's step-graph limit).

    Least squares on relative error; a slope that comes out negative (more work, less time: noise)
    is dropped and the rest refitted.
    """
    if len(points) < 6:
        return None
    features = np.array([_mixed_features(p, graph_tokens) for p in points])
    measured = np.array([p["seconds"] for p in points])
    weights = 1.0 / measured
    active = list(range(features.shape[1]))
    while True:
        x = features[:, active] * weights[:, None]
        scale = np.abs(x).max(axis=0)  # columns span 1 to 1e10: scale them for lstsq
        coef, *_ = np.linalg.lstsq(x / scale, measured * weights, rcond=None)
        coef = coef / scale
        negative = [j for j, c in zip(active, coef) if j > 0 and c < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda j: coef[active.index(j)]))
    full = [0.0] * features.shape[1]
    for j, c in zip(active, coef):
        full[j] = float(c)
    return tuple(full)


def _predict(model: PerfModel, kind: str, p: dict) -> float:
    if kind == "prefill":
        return model.prefill_s(p["num_new_tokens"], p["num_cached_tokens"])
    if kind == "decode":
        return model.decode_s(p["batch_size"], p["num_context_tokens"])
    if kind == "mixed":
        return model.step_s(p["num_prefill_tokens"], p["num_prefill_cached_tokens"],
                            p["num_decode_seqs"], p["num_decode_context_tokens"])
    return model.transfer_s(p["num_bytes"])


def _points(profile: dict, kind: str) -> list[dict]:
    if kind == "transfer":
        return list((profile.get("transfer") or {}).get("points") or [])
    return list(profile.get(kind) or [])


def holdout_error(profile: dict, fraction: float = 0.2, seed: int = 0) -> dict:
    """Relative error on profile points the model was not fitted on, per step kind.

    `fraction` of each kind's points is held back at random (seeded), the model is fitted on the
    rest, and |predicted - measured| / measured is summarised as mean, p90 and max per kind.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    held: dict[str, list[dict]] = {}
    kept = dict(profile)
    for kind in KINDS:
        points = _points(profile, kind)
        num_held = int(round(fraction * len(points))) if len(points) >= 3 else 0
        order = list(range(len(points)))
        rng.shuffle(order)
        held[kind] = [points[i] for i in order[:num_held]]
        rest = [points[i] for i in sorted(order[num_held:])]
        if kind == "transfer":
            kept["transfer"] = {**(profile.get("transfer") or {}), "points": rest}
        else:
            kept[kind] = rest
    model = PerfModel.from_profile(kept)
    report = {}
    for kind, points in held.items():
        errors = sorted(abs(_predict(model, kind, p) - p["seconds"]) / p["seconds"]
                        for p in points)
        if not errors:
            report[kind] = {"num_points": 0}
            continue
        report[kind] = {"num_points": len(errors), "mean": sum(errors) / len(errors),
                        "p90": errors[min(len(errors) - 1, int(0.9 * len(errors)))],
                        "max": errors[-1]}
    return report
