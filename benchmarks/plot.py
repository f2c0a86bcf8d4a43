"""Charts of benchmark runs (matplotlib, Agg backend): a load sweep (latency percentiles and throughput
against concurrency) and an autoscaling run (load, replicas and TTFT p90 over time).

Runs in the benchmark's process after its load finished; owns no socket. Imports matplotlib only when
called, so the benchmarks start (and run) without it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

_SERIES = (("ttft_ms", "p50", "TTFT p50"), ("ttft_ms", "p99", "TTFT p99"),
           ("itl_ms", "p50", "inter-token p50"), ("itl_ms", "p99", "inter-token p99"),
           ("e2e_ms", "p50", "e2e p50"), ("e2e_ms", "p99", "e2e p99"))


def plot_levels(levels: Sequence[dict[str, Any]], path: str, title: str = "tokenrelay load") -> None:
    """Write a PNG with one point per level; each level is {"concurrency": N, "summary": {...}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv["concurrency"] for lv in levels]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, pct, label in _SERIES:
        ys = [lv["summary"][key][pct] for lv in levels]
        lat.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=label)
    lat.set_xlabel("concurrent clients")
    lat.set_ylabel("ms")
    lat.set_yscale("log")
    lat.set_title("latency")
    lat.legend(fontsize=8)
    tokens = [lv["summary"]["output_tokens_per_s"] for lv in levels]
    rps = [lv["summary"]["rps"] for lv in levels]
    thr.plot(xs, tokens, marker="o", color="tab:blue", label="output tokens/s")
    thr.set_xlabel("concurrent clients")
    thr.set_ylabel("output tokens/s", color="tab:blue")
    thr.set_title("throughput")
    rps_ax = thr.twinx()
    rps_ax.plot(xs, rps, marker="s", color="tab:orange", label="requests/s")
    rps_ax.set_ylabel("requests/s", color="tab:orange")
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 10:
        lat.set_xscale("log")
        thr.set_xscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _minor_label(value: float, _pos: object) -> str:
    """Label the 2s and 5s between the decades of a log axis (20, 50, 200, 500), not every tick."""
    if value <= 0:
        return ""
    lead = round(value / 10 ** math.floor(math.log10(value)), 6)
    return "%g" % value if lead in (2, 5) else ""


def plot_autoscale(series: dict[str, Any], path: str, title: str) -> None:
    """Write a PNG of an autoscaling run from benchmarks.autoscale.plot_series: clients and the head's
    desired and ready replicas over time above, TTFT p90 per window against the objective below (log
    scale: it spans tens of milliseconds to seconds), failed requests marked in red, and a triangle when a
    new replica first served after a step up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=(1.2, 1))
    top.fill_between(series["load_t"], series["load_clients"], step="post", color="0.85", label="clients")
    top.set_ylabel("clients")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_ylim(0, max(series["load_clients"] + [1]) * 1.35)  # headroom: the legend sits above the lines
    reps = top.twinx()
    reps.step(series["sample_t"], series["desired"], where="post", color="tab:blue", linestyle="--",
              linewidth=2, label="desired replicas")
    reps.step(series["sample_t"], series["ready"], where="post", color="tab:green", linewidth=2,
              label="ready replicas")
    most = max(series["desired"] + series["ready"] + [1])
    reps.set_ylim(0, most * 1.35)
    reps.set_yticks(range(0, most + 1))
    reps.set_ylabel("replicas")
    for t in series["new_replica_t"]:  # a new replica may serve while an old one restarts (count flat)
        reps.plot([t], [0.15], marker="^", color="tab:green", markersize=9, linestyle="none",
                  label="a new replica serving")
    handles = top.get_legend_handles_labels()[0] + reps.get_legend_handles_labels()[0]
    labels = {str(h.get_label()): h for h in handles}  # one entry per label
    reps.legend(list(labels.values()), list(labels), loc="upper center", ncol=len(labels), fontsize=8)
    top.set_title(title, fontsize=10)
    bottom.plot(series["window_mid"], series["ttft_p90_ms"], marker="o", color="tab:purple",
                label="TTFT p90 per window")
    bottom.axhline(series["objective_ms"], color="tab:red", linestyle="--", label="objective")
    failed = [(t, f) for t, f in zip(series["window_mid"], series["failed"], strict=True) if f]
    if failed:
        bottom.scatter([t for t, _ in failed], [series["objective_ms"]] * len(failed), marker="x",
                       color="tab:red", zorder=3, label="window with failed requests")
    bottom.set_yscale("log")
    bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: "%g" % v))  # 100, not 10^2
    bottom.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
    low, high = bottom.get_ylim()
    bottom.set_ylim(low, max(high, series["objective_ms"] * 1.6))  # the objective line clear of the top
    bottom.set_ylabel("TTFT p90 (ms)")
    bottom.set_xlabel("seconds since the load started")
    bottom.legend(fontsize=8, loc="best")
    for ax in (top, bottom):
        for t in series["phase_starts"]:
            ax.axvline(t, color="0.5", linewidth=0.8, linestyle=":")
        ax.grid(axis="y", alpha=0.3)
    bottom.set_xlim(0, max(series["load_t"] + series["sample_t"] + [1]))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
