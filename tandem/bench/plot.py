"""`--plot FILE.png`: latency CDFs (TTFT, ITL, E2E) and output throughput over time.

Throughput is binned from each token chunk's arrival time, weighted by the tokens the chunk
carried. matplotlib is imported only when a plot is asked for, with the Agg backend so that no
display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tandem.bench.records import RequestRecord


def output_tokens_per_bin(records: Sequence[RequestRecord], duration_s: float,
                          bin_s: float = 1.0) -> list[float]:
    """Output tokens per second in consecutive bins of `bin_s` from the start of the run.

    The last bin is usually cut short by the end of the run; its rate is over the time it covers,
    so a run's tail does not look like a throughput drop.
    """
    num_bins = max(1, math.ceil(duration_s / bin_s))
    tokens = [0.0] * num_bins
    for record in records:
        if not record.is_ok:
            continue
        for time_s, count in zip(record.chunk_times_s, record.chunk_tokens):
            tokens[min(int(time_s / bin_s), num_bins - 1)] += count
    widths_s = [bin_s] * num_bins
    last_width_s = duration_s - (num_bins - 1) * bin_s
    if 0 < last_width_s < bin_s:
        widths_s[-1] = last_width_s
    return [count / width_s for count, width_s in zip(tokens, widths_s)]


def save_plot(records: Sequence[RequestRecord], duration_s: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.is_ok]
    series = {
        "TTFT (ms)": [r.ttft_ms for r in ok if r.ttft_ms is not None],
        "ITL (ms)": [gap for r in ok for gap in r.itl_ms],
        "E2E (ms)": [r.e2e_ms for r in ok],
    }
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    for axis, (label, values) in zip(axes.flat, series.items()):
        _plot_cdf(axis, sorted(values), label)
    per_bin = output_tokens_per_bin(records, duration_s)
    throughput_axis = axes.flat[3]
    edges_s = [min(float(i), duration_s) for i in range(len(per_bin))] + [duration_s]
    throughput_axis.stairs(per_bin, edges_s, fill=True, alpha=0.6)
    throughput_axis.set_title("output throughput")
    throughput_axis.set_xlabel("time since start (s)")
    throughput_axis.set_ylabel("output tokens/s (1 s bins)")
    throughput_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_cdf(axis, values: list[float], label: str) -> None:
    if values:
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        axis.step(values, fractions, where="post")
    axis.set_title(f"{label.split()[0]} CDF ({len(values)} samples)")
    axis.set_xlabel(label)
    axis.set_ylabel("fraction of samples")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
