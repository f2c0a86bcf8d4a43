"""Overload benchmark: two mock replicas offered 1x and then 10x their capacity; prints admitted latency
percentiles, rejections and how fast they were answered, and the most any replica held.

Runs as a script in its own process: starts a `python -m runtime up` stack with the mock engine on free
127.0.0.1 ports (benchmarks.stack.MockStack; only its config dict is adjusted here), drives it open-loop
(Poisson arrivals, one connection per request, this process's asyncio loop), samples the replicas'
own load from the head's status, and stops the stack. Stops only what it started.

    python benchmarks/overload.py                       # 2 replicas x max_ongoing 4, 1x then 10x, 15 s each
    python benchmarks/overload.py --max-ongoing 8 --factor 10 --duration 20 --queue-size 4 --queue-timeout 1

Capacity = replicas x max_ongoing_requests / service time, service time = TTFT + tokens x ITL (measured
first with one request alone). "admitted" are requests answered 200 and streamed to [DONE]; "rejected"
are 429 (queue full or queue timeout) and 503; their latency is the time to the whole response.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.floor_server import install_uvloop  # noqa: E402
from benchmarks.http_client import Connection, build_request  # noqa: E402
from benchmarks.loadgen import raise_fd_limit  # noqa: E402
from benchmarks.stack import MockStack  # noqa: E402
from benchmarks.stats import RequestRecord, distribution_ms  # noqa: E402
from runtime.head_client import HeadRefused, HeadUnreachable, status  # noqa: E402
from runtime.credentials import client_token  # noqa: E402

log = logging.getLogger("bench")


async def _one(request: bytes, port: int, out: list[RequestRecord], timeout: float) -> None:
    conn = Connection("127.0.0.1", port)
    try:
        rec, _ = await conn.stream(request, timeout)
    finally:
        conn.close()
    out.append(rec)


async def offer(port: int, request: bytes, rate: float, duration: float, timeout: float,
                seed: int) -> list[RequestRecord]:
    """Poisson arrivals at `rate` per second for `duration` seconds; waits for every request."""
    rng = random.Random(seed)
    records: list[RequestRecord] = []
    tasks = []
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    next_at = loop.time()
    while next_at < end:
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        tasks.append(asyncio.ensure_future(_one(request, port, records, timeout)))
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    return records


class LoadSampler:
    """Polls the head's status: the most requests (running + waiting) any replica reported."""

    def __init__(self, head: str, token: str, deployment: str, keys: Optional[Path] = None) -> None:
        self._head, self._token, self._deployment, self._keys = head, token, deployment, keys
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                reply = status(self._head, self._token, timeout=1.0, keys=self._keys)
            except (HeadRefused, HeadUnreachable):
                continue
            for dep in reply.deployments:
                if dep.name == self._deployment:
                    for r in dep.replica_list:
                        held = r.running + r.waiting
                        self.peak[r.replica_id] = max(self.peak.get(r.replica_id, 0), held)


def summarize(records: list[RequestRecord], duration: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    rejected = [r for r in records if r.status in (429, 503)]
    other = [r for r in records if not r.ok and r.status not in (429, 503)]
    return {
        "offered": len(records), "offered_rps": round(len(records) / duration, 1),
        "admitted": len(ok), "admitted_rps": round(len(ok) / duration, 1),
        "rejected": len(rejected), "rejected_by_status": {s: sum(1 for r in rejected if r.status == s)
                                                         for s in sorted({r.status for r in rejected})},
        "other_failures": {k: sum(1 for r in other if r.failure == k) for k in sorted({r.failure for r in other})},
        "admitted_ttft_ms": distribution_ms(r.ttft for r in ok if r.ttft is not None),
        "admitted_e2e_ms": distribution_ms(r.e2e for r in ok),
        "rejection_ms": distribution_ms(r.e2e for r in rejected),
        "rejected_within_50ms": sum(1 for r in rejected if r.e2e < 0.05),
    }


def _row(name: str, d: dict[str, Any]) -> str:
    def f(v: Optional[float]) -> str:
        return "-" if v is None else "%.1f" % v
    return "  %-22s p50 %8s  p90 %8s  p99 %8s  max %8s  (n=%d)" % (
        name, f(d["p50"]), f(d["p90"]), f(d["p99"]), f(d["max"]), d["count"])


def report(label: str, s: dict[str, Any], peak: dict[str, int], limit: int) -> None:
    print("== %s: offered %d (%.1f/s), admitted %d (%.1f/s), rejected %d %s, other failures %s" % (
        label, s["offered"], s["offered_rps"], s["admitted"], s["admitted_rps"], s["rejected"],
        s["rejected_by_status"] or "", s["other_failures"] or "none"))
    print(_row("admitted TTFT ms", s["admitted_ttft_ms"]))
    print(_row("admitted e2e ms", s["admitted_e2e_ms"]))
    print(_row("rejection ms", s["rejection_ms"]))
    if s["rejected"]:
        print("  rejections answered within 50 ms: %.0f%% (the rest waited in the queue up to its timeout)"
              % (100.0 * s["rejected_within_50ms"] / s["rejected"]))
    print("  most requests a replica reported holding: %s (limit %d)" % (
        ", ".join("%s=%d" % kv for kv in sorted(peak.items())) or "-", limit))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-ongoing", type=int, default=4, help="max_ongoing_requests per replica")
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="proxy workers")
    p.add_argument("--queue-size", type=int, default=4, help="routing.queue_size per worker")
    p.add_argument("--queue-timeout", type=float, default=0.5, help="routing.queue_timeout_s")
    p.add_argument("--factor", type=float, default=10.0, help="overload: offered load / capacity")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(message)s")
    install_uvloop()
    raise_fd_limit()
    stack = MockStack(ns.replicas, ns.ttft_ms, ns.itl_ms, ns.tokens, ns.workers, ns.max_ongoing)
    dep = stack.config["deployments"][0]
    dep["engine_args"]["max_running"] = ns.max_ongoing  # the engine's own batch limit: more would wait
    dep["routing"] = {"queue_size": ns.queue_size, "queue_timeout_s": ns.queue_timeout}
    request = build_request("127.0.0.1", stack.port, "/v1/completions",
                            {"model": stack.model, "prompt": "overload", "stream": True})
    try:
        stack.start()
        stack.wait_ready()
        token = client_token(None, str(stack.dir / "state"))
        alone = asyncio.run(offer(stack.port, request, 1000.0, 0.001, ns.timeout, ns.seed))
        service = alone[0].e2e
        capacity = ns.replicas * ns.max_ongoing / service
        print("tokenrelay overload benchmark: %d replicas x max_ongoing %d, mock TTFT %.0f ms + %d x %.0f ms, "
              "%d proxy workers, queue %d per worker for %.1f s" % (
                  ns.replicas, ns.max_ongoing, ns.ttft_ms, ns.tokens, ns.itl_ms, ns.workers, ns.queue_size,
                  ns.queue_timeout))
        print("one request alone: %.0f ms; capacity %.1f requests/s" % (service * 1000, capacity))
        for label, factor in (("1x capacity (0.8x offered)", 0.8), ("%gx capacity" % ns.factor, ns.factor)):
            with LoadSampler(stack.control, token, stack.model, stack.keys) as sampler:
                records = asyncio.run(offer(stack.port, request, capacity * factor, ns.duration, ns.timeout,
                                            ns.seed))
            report(label, summarize(records, ns.duration), sampler.peak, ns.max_ongoing)
            time.sleep(1.0)  # let the replicas drain between phases
    except RuntimeError:
        print(stack.log_tail(), file=sys.stderr)
        raise
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
