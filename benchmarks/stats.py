"""Pure statistics of a load run: one record per request, percentiles, and the run summary.

Runs in the load generator process after (or between) runs; owns no socket, reads no clock.

Which requests count where (a run has a ramp [t0, ws) and a measured window [ws, we)):
  latency (TTFT, inter-token, e2e)  ok requests that *started* in the window; every one of them is
                                    waited for, so slow requests are not cut off (no survivor bias)
  throughput (RPS, tokens/s)        ok requests that *ended* in the window, over its length: the rate the
                                    server delivered at in steady state, ramp or drain excluded
  failures                          requests that started in the window, by kind
  ramp                              requests that started in the ramp, reported apart
In `--requests` mode the window ends when the last measured request ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestRecord:
    """One request, recorded once at its end. Times are seconds on the run's monotonic clock."""

    start: float
    end: float
    status: int = 0                 # HTTP status, 0 when no response head arrived
    failure: Optional[str] = None   # None, "connect", "http_<status>", "truncated" or "timeout"
    ttft: Optional[float] = None    # seconds to the first content event
    events: int = 0                 # content events
    tokens: int = 0                 # usage completion_tokens when sent, else content events
    ramp: bool = False              # started before the measured window

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def e2e(self) -> float:
        return self.end - self.start


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linearly interpolated (NaN when empty)."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if n == 1:
        return float(sorted_values[0])
    rank = (n - 1) * q / 100.0
    lo = int(math.floor(rank))
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def distribution_ms(values: Iterable[float]) -> dict[str, Any]:
    """p50/p90/p99/max/mean and count of values in seconds, reported in milliseconds."""
    ordered = sorted(values)
    out: dict[str, Any] = {"count": len(ordered)}
    for q in PERCENTILES:
        out["p%g" % q] = _ms(percentile(ordered, q))
    out["max"] = _ms(ordered[-1]) if ordered else None
    out["mean"] = _ms(math.fsum(ordered) / len(ordered)) if ordered else None
    return out


def _ms(seconds: float) -> Optional[float]:
    return None if math.isnan(seconds) else round(seconds * 1000.0, 3)


def summarize(records: Sequence[RequestRecord], gaps: Sequence[float], window_start: float,
              window_end: Optional[float]) -> dict[str, Any]:
    """The summary of one run. `gaps` are the inter-token gaps of the measured ok requests.

    `window_end` None means "requests mode": the window ends with the last measured request.
    """
    measured = [r for r in records if not r.ramp]
    ramp = [r for r in records if r.ramp]
    ok = [r for r in measured if r.ok]
    failures: dict[str, int] = {}
    for r in measured:
        if r.failure is not None:
            failures[r.failure] = failures.get(r.failure, 0) + 1
    if window_end is None:
        window_end = max((r.end for r in measured), default=window_start)
        delivered = ok
    else:
        delivered = [r for r in records if r.ok and window_start <= r.end <= window_end]
    window = max(window_end - window_start, 1e-9)
    tokens = sum(r.tokens for r in delivered)
    return {
        "window_s": round(window, 3),
        "requests": {"ok": len(ok), "failed": len(measured) - len(ok), "failures": failures,
                     "ramp": len(ramp), "ramp_failed": sum(1 for r in ramp if not r.ok)},
        "rps": round(len(delivered) / window, 3),
        "output_tokens_per_s": round(tokens / window, 1),
        "tokens_per_request": round(sum(r.tokens for r in ok) / len(ok), 2) if ok else None,
        "ttft_ms": distribution_ms(r.ttft for r in ok if r.ttft is not None),
        "itl_ms": distribution_ms(gaps),
        "e2e_ms": distribution_ms(r.e2e for r in ok),
    }


def format_summary(summary: dict[str, Any], label: str = "") -> str:
    """A human-readable block of a summary (as printed by the CLI)."""
    req = summary["requests"]
    kinds = ", ".join("%s=%d" % kv for kv in sorted(req["failures"].items())) or "none"
    lines = [
        "%srequests ok=%d failed=%d (%s); ramp excluded=%d (failed %d)" % (
            label, req["ok"], req["failed"], kinds, req["ramp"], req["ramp_failed"]),
        "%sthroughput %.1f req/s, %.0f output tokens/s over %.1f s%s" % (
            label, summary["rps"], summary["output_tokens_per_s"], summary["window_s"],
            "; load generator CPU %.0f%% of a core" % (100 * summary["loadgen_cpu_util"])
            if summary.get("loadgen_cpu_util") is not None else ""),
        "%s%-12s %9s %9s %9s %9s %8s" % (label, "latency ms", "p50", "p90", "p99", "max", "count"),
    ]
    for key, name in (("ttft_ms", "TTFT"), ("itl_ms", "inter-token"), ("e2e_ms", "e2e")):
        d = summary[key]
        lines.append("%s%-12s %9s %9s %9s %9s %8d" % (
            label, name, _fmt(d["p50"]), _fmt(d["p90"]), _fmt(d["p99"]), _fmt(d["max"]), d["count"]))
    return "\n".join(lines)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else "%.2f" % value
