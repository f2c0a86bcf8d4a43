"""The load generator's own ceiling (`loadgen.py --self-test`): load an in-process floor and time the client.

Runs in the load generator process: the floor server (benchmarks.floor_server.FloorServer) gets its own
thread and event loop, the clients run on the main thread's loop, and each side's CPU time is read with
`time.thread_time()`, so the client's cost per event is known even though both share one process (and
one GIL). Owns the floor's listening socket, on 127.0.0.1 only.

Two phases:
  burst  zero TTFT and inter-token delay: the most events/s and requests/s the generator consumed. Events
         arrive several per read here, the cheapest case.
  paced  streams paced so the offered load is ~20,000 events/s (the 1,000-stream target), mostly one
         event per read: the client's CPU per event and share of a core at that rate.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from benchmarks.floor_server import FloorServer
from benchmarks.loadgen import LoadConfig, run_level


def measure(concurrency: int, duration: float, tokens: int, itl_ms: float) -> dict[str, Any]:
    """One phase: `concurrency` clients against an in-process floor with TTFT = ITL = `itl_ms`."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()  # uvloop when the caller installed its policy
        server = FloorServer(port=0, ttft_ms=itl_ms, itl_ms=itl_ms, tokens=tokens)
        loop.run_until_complete(server.start())
        box.update(port=server.port, loop=loop)
        cpu0 = time.thread_time()
        ready.set()
        loop.run_forever()
        box["server_cpu"] = time.thread_time() - cpu0
        loop.run_until_complete(server.stop())
        loop.close()

    thread = threading.Thread(target=serve, name="floor", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the in-process floor did not start")
    cfg = LoadConfig(url="http://127.0.0.1:%d" % box["port"], concurrency=concurrency, duration=duration,
                     ramp=min(1.0, duration / 5), max_tokens=tokens, progress=0)
    cpu0 = time.thread_time()
    level = asyncio.run(run_level(cfg))
    client_cpu = time.thread_time() - cpu0
    box["loop"].call_soon_threadsafe(box["loop"].stop)
    thread.join(10)
    s = level["summary"]
    per_event_us = 1e6 * client_cpu / max(level["events"], 1)
    return {"concurrency": concurrency, "tokens_per_request": tokens, "itl_ms": itl_ms,
            "window_s": s["window_s"], "events_per_s": s["output_tokens_per_s"], "requests_per_s": s["rps"],
            "failed": s["requests"]["failed"], "client_cpu_s": round(client_cpu, 3),
            "server_cpu_s": round(box.get("server_cpu", float("nan")), 3),
            "client_cpu_us_per_event": round(per_event_us, 2),
            "client_core_share": round(client_cpu / max(time_span(cfg, s), 1e-9), 3)}


def time_span(cfg: LoadConfig, summary: dict[str, Any]) -> float:
    """Approximate wall time of a phase (ramp + window + one stream's drain) for the core share."""
    return cfg.ramp + summary["window_s"] + (summary["e2e_ms"]["p50"] or 0.0) / 1000.0


def self_test(duration: float = 5.0, tokens: int = 64) -> dict[str, Any]:
    return {"burst": measure(64, duration, tokens, itl_ms=0.0),
            # 200 streams x one event per 10 ms = 20,000 events/s offered
            "paced": measure(200, duration, tokens, itl_ms=10.0)}


def print_self_test(res: dict[str, Any]) -> None:
    b, p = res["burst"], res["paced"]
    print("loadgen self-test (in-process floor in its own thread; CPU per thread)")
    print("  burst: %d clients, %d-token streams, no delays, %.1f s window"
          % (b["concurrency"], b["tokens_per_request"], b["window_s"]))
    print("    consumed %8.0f events/s  %6.0f requests/s  failed %d; client %.2f us CPU/event "
          "(events batched per read)" % (b["events_per_s"], b["requests_per_s"], b["failed"],
                                         b["client_cpu_us_per_event"]))
    print("  paced: %d clients, one event per %g ms each (%.0f events/s offered), %.1f s window"
          % (p["concurrency"], p["itl_ms"], p["concurrency"] * 1000.0 / p["itl_ms"], p["window_s"]))
    print("    consumed %8.0f events/s  %6.0f requests/s  failed %d; client %.2f us CPU/event, "
          "%.0f%% of a core" % (p["events_per_s"], p["requests_per_s"], p["failed"],
                                p["client_cpu_us_per_event"], 100 * p["client_core_share"]))
    if p["client_cpu_us_per_event"]:
        print("  => ceiling about %.0f paced events/s on one core for the client alone"
              % (1e6 / p["client_cpu_us_per_event"]))
