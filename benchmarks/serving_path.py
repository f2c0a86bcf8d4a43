"""Serving-path benchmark: tokenrelay with the mock engine against the floor (no proxy), same load and timing.

Runs as a script in its own process: starts a `python -m runtime up` stack on free 127.0.0.1 ports,
measures it with the load generator (benchmarks.loadgen, in this process's event loop), stops it, then
does the same with benchmarks/floor_server.py, and prints what tokenrelay adds: TTFT and inter-token
latency, failures, throughput, and the proxy's CPU seconds per 1,000 streamed tokens (the proxy process
tree: the `-m proxy` gunicorn master and its workers). Stops only what it started.

    python benchmarks/serving_path.py --preset issue2 --duration 15 --out results/issue2.json
    python benchmarks/serving_path.py --replicas 2 --ttft-ms 20 --itl-ms 10 --tokens 64 \
        --concurrency 100 --duration 20 --ramp 2 --workers 2
Presets: issue2 (2 replicas, TTFT 20 ms, 10 ms between tokens, 64 tokens, 100 clients), scale1000
(2 replicas, TTFT 50 ms, 50 ms between tokens, 128 tokens, 1000 clients, 20 s ramp, 60 s measured) and
scale10k (2 replicas, TTFT 50 ms, 500 ms between tokens, 128 tokens, 10,000 clients, 60 s ramp, 120 s
measured). The floor is benchmarks/floor_server.py on its exact (absolute) timer.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import platform
import sys
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.floor_server import install_uvloop  # noqa: E402
from benchmarks.loadgen import LoadConfig, raise_fd_limit, run_level  # noqa: E402
from benchmarks.meters import (  # noqa: E402
    CpuMeter, GcMeter, ReplicaCounters, RssMeter, per_1k_tokens, stack_cpu_meters,
)
from benchmarks.stack import FloorProcess, MockStack  # noqa: E402
from benchmarks.stats import format_summary  # noqa: E402
from runtime.stack_config import single_host_proxy_workers  # noqa: E402

log = logging.getLogger("bench")

PRESETS: dict[str, dict[str, Any]] = {
    "issue2": {"replicas": 2, "ttft_ms": 20.0, "itl_ms": 10.0, "tokens": 64, "concurrency": 100,
               "ramp": 2.0, "duration": 20.0},
    "scale1000": {"replicas": 2, "ttft_ms": 50.0, "itl_ms": 50.0, "tokens": 128, "concurrency": 1000,
                  "ramp": 20.0, "duration": 60.0},
    # a stream takes 50 + 127 x 500 ms = 63.6 s: the client timeout must be longer
    "scale10k": {"replicas": 2, "ttft_ms": 50.0, "itl_ms": 500.0, "tokens": 128, "concurrency": 10000,
                 "ramp": 60.0, "duration": 120.0, "timeout": 120.0},
}
DEFAULTS: dict[str, Any] = dict(PRESETS["issue2"], workers=None, endpoint="completions", timeout=60.0)


def _measure(cfg: LoadConfig, meters: dict[str, CpuMeter], replicas: Optional[ReplicaCounters] = None,
             gc: Optional[GcMeter] = None, rss: Optional[RssMeter] = None) -> dict[str, Any]:
    """One load level with every meter sampled at the measured window's start and end (the proxy's
    resident memory at the end, when every client has a stream open)."""
    def start() -> None:
        for m in meters.values():
            m.start()
        if replicas is not None:
            replicas.start()
        if gc is not None:
            gc.start()

    def stop() -> None:
        for m in meters.values():
            m.stop()
        if replicas is not None:
            replicas.stop()
        if rss is not None:
            rss.loaded()
        if gc is not None:
            gc.stop()

    result = asyncio.run(run_level(cfg, on_window_start=start, on_window_end=stop))
    s = result["summary"]
    tokens = s["output_tokens_per_s"] * s["window_s"]
    result["cpu"] = {name: {"cpu_s": None if m.seconds is None else round(m.seconds, 3),
                            "cpu_s_per_1k_tokens": per_1k_tokens(m.seconds, tokens),
                            "processes": m.processes}
                     for name, m in meters.items()}
    if replicas is not None and replicas.delta is not None:
        d = replicas.delta
        batches = d["token_batches"]
        per_batch = round(d["generated_tokens"] / batches, 2) if batches else None
        result["replicas"] = {"token_batches_per_s": round(batches / s["window_s"], 1),
                              "tokens_per_batch": per_batch}
    if gc is not None and gc.delta is not None:
        result["gc_pauses"] = {g: {"collections": int(n), "ms": round(sec * 1000.0, 1)}
                               for g, (n, sec) in gc.delta.items()}
    if rss is not None and rss.idle_bytes is not None and rss.loaded_bytes is not None:
        per_stream = rss.per_stream(cfg.concurrency)
        result["proxy_memory"] = {"idle_mib": round(rss.idle_bytes / 2**20, 1),
                                  "loaded_mib": round(rss.loaded_bytes / 2**20, 1),
                                  "open_streams": cfg.concurrency,
                                  "kib_per_stream": None if per_stream is None else round(per_stream / 1024, 1)}
    return result


def run_stack(ns: argparse.Namespace, cfg: LoadConfig, workers: Optional[int]) -> dict[str, Any]:
    max_ongoing = max(64, math.ceil(ns.concurrency / max(ns.replicas, 1)) + 8)  # the benchmark, not a cap
    stack = MockStack(ns.replicas, ns.ttft_ms, ns.itl_ms, ns.tokens, workers, max_ongoing,
                      insecure=ns.insecure)
    try:
        stack.start()
        stack.wait_ready()
        meters = stack_cpu_meters(stack)
        if not stack.proxy_roots():
            log.warning("bench [cpu] no `-m proxy` process found under the launcher: no proxy CPU numbers")
        rss = RssMeter(stack.proxy_roots)
        rss.idle()
        result = _measure(LoadConfig(**{**cfg.__dict__, "url": stack.url}), meters,
                          ReplicaCounters(stack.sd_file), GcMeter(stack.url), rss)
        result["logs"] = str(stack.log_path)
        result["curve"] = not ns.insecure
        result["workers"] = workers or single_host_proxy_workers()
        return result
    except RuntimeError:
        print(stack.log_tail(), file=sys.stderr)
        raise
    finally:
        stack.stop()


def run_floor(ns: argparse.Namespace, cfg: LoadConfig) -> dict[str, Any]:
    floor = FloorProcess(ns.ttft_ms, ns.itl_ms, ns.tokens)
    floor.start()
    try:
        return _measure(LoadConfig(**{**cfg.__dict__, "url": floor.url}), {"floor": CpuMeter(floor.roots)})
    finally:
        floor.stop()


def _get(summary: Optional[dict[str, Any]], key: str, pct: str) -> Optional[float]:
    return None if summary is None else summary[key][pct]


def _cell(value: Optional[float], fmt: str = "%.2f") -> str:
    return "-" if value is None else fmt % value


def _failures(summary: Optional[dict[str, Any]]) -> str:
    if summary is None:
        return "-"
    req = summary["requests"]
    kinds = ",".join("%s=%d" % kv for kv in sorted(req["failures"].items()))
    return "%d/%d%s" % (req["failed"], req["ok"] + req["failed"], " (%s)" % kinds if kinds else "")


Row = tuple[str, ...]  # metric, floor, then (value, added) per tokenrelay run


def _gc_cell(run: dict[str, Any]) -> str:
    pauses = run.get("gc_pauses")
    if not pauses:
        return "-"
    return " ".join("g%s:%d/%.0fms" % (g, v["collections"], v["ms"]) for g, v in sorted(pauses.items()))


def comparison(runs: list[tuple[str, Optional[dict[str, Any]]]], floor: Optional[dict[str, Any]]) -> list[Row]:
    """Rows (metric, floor, then tokenrelay's value and what it adds over the floor, per run)."""
    fs = floor["summary"] if floor else None
    present = [(label, run) for label, run in runs if run is not None]

    def row(name: str, floor_cell: str, cells: list[tuple[str, str]]) -> Row:
        return (name, floor_cell) + tuple(c for pair in cells for c in pair)

    rows = []
    for key, pct, name in (("ttft_ms", "p50", "TTFT p50 ms"), ("ttft_ms", "p99", "TTFT p99 ms"),
                           ("itl_ms", "p50", "inter-token p50 ms"), ("itl_ms", "p99", "inter-token p99 ms"),
                           ("e2e_ms", "p50", "e2e p50 ms"), ("e2e_ms", "p99", "e2e p99 ms")):
        f = _get(fs, key, pct)
        cells = []
        for _, run in present:
            v = _get(run["summary"], key, pct)
            cells.append((_cell(v), _cell(v - f, "%+.2f") if f is not None and v is not None else "-"))
        rows.append(row(name, _cell(f), cells))
    for key, name, fmt in (("rps", "requests/s", "%.1f"), ("output_tokens_per_s", "output tokens/s", "%.0f")):
        f = fs[key] if fs else None
        cells = []
        for _, run in present:
            v = run["summary"][key]
            cells.append((_cell(v, fmt), _cell(v - f, "%+.1f") if f is not None else "-"))
        rows.append(row(name, _cell(f, fmt), cells))
    rows.append(row("failed/measured", _failures(fs), [(_failures(run["summary"]), "") for _, run in present]))
    def cpu(run: dict[str, Any], part: str) -> Optional[float]:
        return run["cpu"].get(part, {}).get("cpu_s_per_1k_tokens")

    def total(run: dict[str, Any]) -> Optional[float]:
        proxy, control = cpu(run, "proxy"), cpu(run, "control")
        return None if proxy is None or control is None else round(proxy + control, 4)

    rows.append(row("tokenrelay CPU s / 1k tokens", "", [
        (_cell(total(run), "%.4f") + " (all but replicas)", _cell(total(run), "%.4f")) for _, run in present]))
    rows.append(row("  proxy", "", [(_cell(cpu(run, "proxy"), "%.4f"), "") for _, run in present]))
    rows.append(row("  launcher+head+agent", "", [(_cell(cpu(run, "control"), "%.4f"), "") for _, run in present]))
    fcpu = floor["cpu"]["floor"]["cpu_s_per_1k_tokens"] if floor else None
    rows.append(row("server CPU s / 1k tokens", _cell(fcpu, "%.4f") + " (floor)",
                    [(_cell(cpu(run, "replicas"), "%.4f") + " (replicas)", "") for _, run in present]))
    if any(run.get("replicas") for _, run in present):
        rows.append(row("replica TokenBatch msgs/s", "", [
            ("%.0f (%s tokens each)" % (run["replicas"]["token_batches_per_s"],
                                        _cell(run["replicas"]["tokens_per_batch"], "%.1f"))
             if run.get("replicas") else "-", "") for _, run in present]))
    if any(run.get("proxy_memory") for _, run in present):
        mem = [run.get("proxy_memory") for _, run in present]
        rows.append(row("proxy RSS idle -> loaded MiB", "", [
            ("%.0f -> %.0f" % (m["idle_mib"], m["loaded_mib"]) if m else "-", "") for m in mem]))
        rows.append(row("proxy memory per open stream KiB", "", [
            (_cell(m["kib_per_stream"], "%.1f") if m else "-", "") for m in mem]))
    if any(run.get("gc_pauses") for _, run in present):
        rows.append(row("proxy GC (gen:count/pause)", "", [(_gc_cell(run), "") for _, run in present]))
    rows.append(row("load generator CPU (cores)", _cell(fs.get("loadgen_cpu_util") if fs else None),
                    [(_cell(run["summary"].get("loadgen_cpu_util")), "") for _, run in present]))
    return rows


def table_header(labels: list[str]) -> Row:
    return ("metric", "floor (no proxy)") + tuple(c for label in labels for c in (label, "added"))


def format_table(rows: list[Row], header: Row) -> str:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join("%%-%ds" % w for w in widths)
    return "\n".join([line % header, line % tuple("-" * w for w in widths)] + [line % r for r in rows])


def parse_workers(text: str) -> list[int]:
    """`--workers 1,2`: one tokenrelay run per proxy worker count, in that order."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("--workers takes counts like 1 or 1,2, got %r" % text) from None
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError("--workers counts must be >= 1, got %r" % text)
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="tokenrelay serving path vs the no-proxy floor.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults for every option below")
    p.add_argument("--replicas", type=int)
    p.add_argument("--ttft-ms", type=float)
    p.add_argument("--itl-ms", type=float)
    p.add_argument("--tokens", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument("--duration", type=float, help="measured seconds after the ramp")
    p.add_argument("--ramp", type=float)
    p.add_argument("--workers", type=parse_workers,
                   help="proxy workers; a list (1,2) runs tokenrelay once per count, all against the same "
                        "floor (default: what `tokenrelay up` picks, half the cores, 1 to 4)")
    p.add_argument("--endpoint", choices=("completions", "chat"))
    p.add_argument("--timeout", type=float, help="seconds per request")
    p.add_argument("--only", choices=("stack", "floor"), help="measure one side only")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--insecure", action="store_true",
                   help="start the stack with `tokenrelay up --insecure` (no CURVE), to measure CURVE's cost")
    p.add_argument("--log-level", default="INFO")
    return p


def resolve(ns: argparse.Namespace) -> argparse.Namespace:
    """Command line over preset over defaults."""
    base = dict(DEFAULTS, **PRESETS.get(ns.preset or "", {}))
    for key, value in base.items():
        if getattr(ns, key, None) is None:
            setattr(ns, key, value)
    return ns


def main(argv: Optional[list[str]] = None) -> int:
    ns = resolve(build_parser().parse_args(argv))
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(message)s")
    uv = install_uvloop()
    raise_fd_limit()
    cfg = LoadConfig(endpoint=ns.endpoint, model="mock", max_tokens=ns.tokens, concurrency=ns.concurrency,
                     ramp=ns.ramp, duration=ns.duration, timeout=ns.timeout)
    worker_counts: list[Optional[int]] = list(ns.workers) if ns.workers else [None]
    runs: list[tuple[str, Optional[dict[str, Any]]]] = []
    floor = None
    try:
        if ns.only != "floor":
            for workers in worker_counts:
                stack = run_stack(ns, cfg, workers)
                label = "%d worker%s%s" % (stack["workers"], "" if stack["workers"] == 1 else "s",
                                           "" if workers else " (default)")
                print("== tokenrelay (%d replicas, proxy %s)" % (ns.replicas, label))
                print(format_summary(stack["summary"], "  "))
                runs.append((label, stack))
        if ns.only != "stack":
            floor = run_floor(ns, cfg)
            print("== floor (no proxy)")
            print(format_summary(floor["summary"], "  "))
    except RuntimeError as exc:
        log.error("bench %s", exc)
        return 1
    print("\nserving path: %d clients, TTFT %g ms, %g ms between tokens, %d tokens, %d replicas, "
          "%g s measured, %s" % (ns.concurrency, ns.ttft_ms, ns.itl_ms, ns.tokens, ns.replicas, ns.duration,
                                 "INSECURE (no CURVE)" if ns.insecure else "CURVE on"))
    rows = comparison(runs, floor)
    header = table_header([label for label, _ in runs])
    print(format_table(rows, header))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        keys = ("preset", "replicas", "ttft_ms", "itl_ms", "tokens", "concurrency", "duration", "ramp",
                "workers", "endpoint", "timeout", "insecure")
        settings = {k: getattr(ns, k) for k in keys}
        Path(ns.out).write_text(json.dumps({
            "settings": settings, "event_loop": "uvloop" if uv else "asyncio",
            "python": platform.python_version(), "tokenrelay": runs[0][1] if runs else None,
            "tokenrelay_runs": [{"label": label, "result": run} for label, run in runs], "floor": floor,
            "table": {"header": header, "rows": rows}}, indent=2))
        log.info("bench [done] wrote %s", ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
