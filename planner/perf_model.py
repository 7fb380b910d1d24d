"""Performance model: the time of any engine step, predicted from a measured profile.

`tandem profile` (planner/profile.py) measures step times on a grid; this module turns those points
into a predictor. The simulator calls it for every simulated step, hundreds of thousands of times
a run, so a prediction is a few bisections and multiply-adds over small sorted Python lists: no
torch, no grpc, no numpy on the prediction path (numpy only fits the mixed-step residual).

The form follows what each step is bound by:

- Prefill (new tokens N, cached tokens C): one curve over N per measured C, piecewise linear in
  log N / log t, because the time is flat while reading the weights dominates and then grows with N
  (a knee that log-log interpolation follows on a power-of-two grid). Between two C curves the time
  is interpolated linearly in C at the same N: attention over the cached prefix adds N * C work.
- Decode (batch B, total context K): one curve over K per measured B, linear in K (the KV bytes
  read grow linearly), and linear in B between curves at the same K.
- Mixed (a prefill chunk with a decode batch, as chunked prefill runs them): the prefill of N + B
  tokens, plus a residual a + b * B + c * K fitted by least squares to the measured mixed steps
  (weighted to minimise relative error): what the decode rows cost inside an eager prefill step.
- Transfer (bytes): piecewise linear in bytes (latency plus bytes over bandwidth).

Outside the grid, the end segments extend, with slopes clamped at zero so that more work is never
predicted to be faster. `holdout_error` reports how well this predicts profile points it was not
fitted on.
"""

from __future__ import annotations

import json
import logging
import math
import random
from bisect import bisect_right
from typing import Iterable

import numpy as np

logger = logging.getLogger(__name__)

KINDS = ("prefill", "decode", "mixed", "transfer")


class Curve:
    """t(x) through measured (x, t) points, piecewise linear in x or in (log x, log t)."""

    __slots__ = ("xs", "ys", "log_log")

    def __init__(self, points: Iterable[tuple[float, float]], log_log: bool):
        merged: dict[float, list[float]] = {}
        for x, t in points:
            merged.setdefault(float(x), []).append(float(t))
        xs = sorted(merged)
        ys = non_decreasing([sum(merged[x]) / len(merged[x]) for x in xs])
        self.log_log = log_log
        if log_log:
            xs = [math.log(max(x, 1.0)) for x in xs]
            ys = [math.log(max(y, 1e-12)) for y in ys]
        self.xs, self.ys = xs, ys

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if self.log_log:
            x = math.log(x) if x > 1.0 else 0.0
        n = len(xs)
        if n == 1:
            y = ys[0]
        else:
            i = bisect_right(xs, x) - 1
            i = 0 if i < 0 else (n - 2 if i > n - 2 else i)
            x0, y0 = xs[i], ys[i]
            slope = (ys[i + 1] - y0) / (xs[i + 1] - x0)
            if slope < 0.0 and (x < xs[0] or x > xs[-1]):
                slope = 0.0  # never extrapolate a falling time
            y = y0 + slope * (x - x0)
        return math.exp(y) if self.log_log else max(y, 0.0)


def non_decreasing(ys: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators).

    More work never takes less time; where a measurement says otherwise it is noise (a host hiccup
    in one of a few repeats), and pooling it with its neighbours keeps it from bending the curve.
    """
    blocks: list[list[float]] = []  # [mean, count]
    for y in ys:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            prev = blocks[-1]
            prev[0] = (prev[0] * prev[1] + mean * count) / (prev[1] + count)
            prev[1] += count
    return [mean for mean, count in blocks for _ in range(int(count))]


class CurveFamily:
    """Curves over one axis, one per value of a second axis, interpolated linearly across it."""

    __slots__ = ("keys", "curves")

    def __init__(self, rows: Iterable[tuple[float, float, float]], log_log: bool):
        by_key: dict[float, list[tuple[float, float]]] = {}
        for key, x, t in rows:
            by_key.setdefault(float(key), []).append((x, t))
        self.keys = sorted(by_key)
        self.curves = [Curve(by_key[k], log_log) for k in self.keys]

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


class PerfModel:
    """Step and transfer times, in seconds, for one model on one device."""

    def __init__(self, block_size: int, kv_bytes_per_token: int, prefill: CurveFamily,
                 decode: CurveFamily, mixed_coef_s: tuple[float, float, float],
                 transfer: Curve | None, meta: dict | None = None):
        self.block_size = block_size
        self.kv_bytes_per_token = kv_bytes_per_token
        self._prefill = prefill
        self._decode = decode
        self._mixed_a, self._mixed_b, self._mixed_c = mixed_coef_s
        self._transfer = transfer
        self.meta = meta or {}

    @classmethod
    def from_profile(cls, profile: dict) -> "PerfModel":
        if not profile.get("prefill") or not profile.get("decode"):
            raise ValueError("the profile needs prefill and decode points; "
                             "rerun `tandem profile` to measure them")
        prefill = CurveFamily(((p["num_cached_tokens"], p["num_new_tokens"], p["seconds"])
                               for p in profile["prefill"]), log_log=True)
        decode = CurveFamily(((p["batch_size"], p["num_context_tokens"], p["seconds"])
                              for p in profile["decode"]), log_log=False)
        mixed = fit_mixed_residual(profile.get("mixed", []), prefill, decode)
        points = (profile.get("transfer") or {}).get("points") or []
        transfer = Curve(((p["num_bytes"], p["seconds"]) for p in points), log_log=False) \
            if points else None
        meta = {k: profile.get(k) for k in ("model", "device_name", "date", "tandem_version")}
        return cls(int(profile["block_size"]), int(profile["kv_bytes_per_token"]), prefill,
                   decode, mixed, transfer, meta)

    @classmethod
    def load(cls, path: str) -> "PerfModel":
        with open(path) as f:
            return cls.from_profile(json.load(f))

    def prefill_s(self, num_new_tokens: int, num_cached_tokens: int = 0) -> float:
        if num_new_tokens <= 0:
            return 0.0
        return self._prefill(num_cached_tokens, num_new_tokens)

    def decode_s(self, batch_size: int, num_context_tokens: int) -> float:
        """One decode step of the whole batch; num_context_tokens sums the batch's contexts."""
        if batch_size <= 0:
            return 0.0
        return self._decode(batch_size, num_context_tokens)

    def step_s(self, num_prefill_tokens: int, num_prefill_cached_tokens: int,
               num_decode_seqs: int, num_decode_context_tokens: int) -> float:
        """Any step: pure prefill, pure decode, or a prefill chunk beside a decode batch."""
        if num_decode_seqs <= 0:
            return self.prefill_s(num_prefill_tokens, num_prefill_cached_tokens)
        if num_prefill_tokens <= 0:
            return self._decode(num_decode_seqs, num_decode_context_tokens)
        residual = (self._mixed_a + self._mixed_b * num_decode_seqs
                    + self._mixed_c * num_decode_context_tokens)
        return (self._prefill(num_prefill_cached_tokens, num_prefill_tokens + num_decode_seqs)
                + (residual if residual > 0.0 else 0.0))

    def transfer_s(self, num_bytes: int) -> float:
        if num_bytes <= 0:
            return 0.0
        if self._transfer is None:
            raise ValueError("this profile holds no KV transfer points (measured with one device)")
        return self._transfer(num_bytes)


def fit_mixed_residual(points: list[dict], prefill: CurveFamily, decode: CurveFamily
                       ) -> tuple[float, float, float]:
    """(a_s, b_s per decode seq, c_s per context token) of mixed - prefill(N + B, C)."""
    if len(points) < 3:
        # No mixed points: the decode batch's context-dependent cost, as a pure decode step pays it.
        b1, b2 = decode(1, 1), decode(2, 2)
        per_token = max(decode(1, 4097) - b1, 0.0) / 4096
        return 0.0, max(b2 - b1, 0.0), per_token
    rows = np.array([[1.0, p["num_decode_seqs"], p["num_decode_context_tokens"]] for p in points])
    measured = np.array([p["seconds"] for p in points])
    base = np.array([prefill(p["num_prefill_cached_tokens"],
                             p["num_prefill_tokens"] + p["num_decode_seqs"]) for p in points])
    weights = 1.0 / measured  # relative error, so short steps count as much as long ones
    coef, *_ = np.linalg.lstsq(rows * weights[:, None], (measured - base) * weights, rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


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
