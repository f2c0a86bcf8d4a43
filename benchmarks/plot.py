"""Charts of a load sweep: latency percentiles and throughput against concurrency (matplotlib, Agg backend).

Runs in the load generator process after all levels finished; owns no socket. Imports matplotlib only
when called, so the load generator starts (and runs) without it.
"""
from __future__ import annotations

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
