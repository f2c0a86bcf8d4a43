"""Chaos benchmark: SIGKILL a replica every few seconds under steady streaming and non-streaming load, and
count what the clients noticed.

Runs as a script in its own process: starts a `python -m runtime up` stack with the mock engine on free
127.0.0.1 ports (benchmarks.stack.MockStack), drives it closed-loop from this process's asyncio loop
(each client sends its next request when the last one ended), kills one replica process (a random
`model_proc` in the stack's tree; the agent restarts it) every `--kill-every` seconds, and stops the
stack. Stops only what it started.

    python benchmarks/chaos.py                                   # 200 streaming + 50 non-streaming, 2 min
    python benchmarks/chaos.py --duration 20 --streams 40 --plain 10   # a short run

A request failed when it got no 200, an SSE error event, no [DONE], or a completion token count other
than the `--tokens` it asked for (usage counts each token once, so a resume that repeated or lost a token
shows there). "resumed" is the proxy's tokenrelay_proxy_resumes_total. The added latency of a resume is
seen by the client as one long pause in a stream: for streams with a pause longer than the ITL + half
the TTFT, the pause minus the ITL (p50 / p99); the proxy's own view (lost replica noticed -> new first token) is
tokenrelay_proxy_resume_gap_seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from benchmarks.http_client import Connection, build_request, parse_head  # noqa: E402
from benchmarks.loadgen import raise_fd_limit  # noqa: E402
from benchmarks.stack import MockStack, http  # noqa: E402
from benchmarks.stats import percentile  # noqa: E402

log = logging.getLogger("bench")


class Tally:
    def __init__(self) -> None:
        self.ok = {"stream": 0, "plain": 0}
        self.failed: dict[str, int] = {}
        self.pauses: list[float] = []  # per stream, its longest pause between two content events

    def fail(self, kind: str, why: str) -> None:
        key = "%s:%s" % (kind, why)
        self.failed[key] = self.failed.get(key, 0) + 1


async def streaming_client(port: int, request: bytes, tokens: int, until: float, tally: Tally) -> None:
    conn = Connection("127.0.0.1", port)
    try:
        while time.monotonic() < until:
            rec, gaps = await conn.stream(request, 60.0)
            if rec.failure is not None:
                tally.fail("stream", rec.failure)
            elif rec.tokens != tokens:
                tally.fail("stream", "tokens_%d" % rec.tokens)
            else:
                tally.ok["stream"] += 1
                tally.pauses.append(max(gaps) if len(gaps) else 0.0)
    finally:
        conn.close()


async def plain_client(port: int, request: bytes, tokens: int, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            tally.fail("plain", "connect")
            await asyncio.sleep(0.1)
            continue
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60.0)
            status, _, length, _ = parse_head(head)
            body = await asyncio.wait_for(reader.readexactly(length or 0), 60.0)
            if status != 200:
                tally.fail("plain", "http_%d" % status)
            elif json.loads(body)["usage"]["completion_tokens"] != tokens:
                tally.fail("plain", "tokens")
            else:
                tally.ok["plain"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, KeyError):
            tally.fail("plain", "truncated")
        finally:
            writer.close()


def replica_pids(stack: MockStack) -> list[int]:
    if stack.proc is None:
        return []
    try:
        tree = psutil.Process(stack.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in tree:
        try:
            if "model_proc" in " ".join(p.cmdline()):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


async def killer(stack: MockStack, every: float, until: float, rng: random.Random, kills: list[float]) -> None:
    while True:
        await asyncio.sleep(every)
        if time.monotonic() >= until - 1.0:
            return
        pids = replica_pids(stack)
        if not pids:
            log.warning("bench [chaos] no replica process to kill")
            continue
        victim = rng.choice(pids)
        try:
            os.kill(victim, signal.SIGKILL)
            kills.append(time.monotonic())
            log.info("bench [chaos] SIGKILL replica pid %d", victim)
        except ProcessLookupError:
            pass


def proxy_metric(stack: MockStack, name: str) -> float:
    status, body = http("GET", stack.url + "/metrics")
    if status != 200:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith(name) and not line.startswith("#"))


async def run(args: argparse.Namespace, stack: MockStack) -> dict[str, Any]:
    body = {"model": "mock", "prompt": "chaos", "max_tokens": args.tokens}
    stream_req = build_request("127.0.0.1", stack.port, "/v1/completions",
                               dict(body, stream=True, stream_options={"include_usage": True}))
    plain_req = build_request("127.0.0.1", stack.port, "/v1/completions", body).replace(
        b"Accept: text/event-stream", b"Connection: close")
    tally = Tally()
    kills: list[float] = []
    resumed_before = proxy_metric(stack, "tokenrelay_proxy_resumes_total")
    until = time.monotonic() + args.duration
    rng = random.Random(args.seed)
    tasks = [streaming_client(stack.port, stream_req, args.tokens, until, tally) for _ in range(args.streams)]
    tasks += [plain_client(stack.port, plain_req, args.tokens, until, tally) for _ in range(args.plain)]
    tasks.append(killer(stack, args.kill_every, until, rng, kills))
    await asyncio.gather(*tasks)
    itl = args.itl_ms / 1000.0
    # a resume pauses a stream for about the new replica's TTFT on top of the ITL: count pauses longer
    # than ITL + TTFT/2 as resumes (shorter ones are ordinary jitter)
    added = sorted(p - itl for p in tally.pauses if p > itl + args.ttft_ms / 2000.0)
    failed = sum(tally.failed.values())
    return {
        "kills": len(kills), "total": failed + sum(tally.ok.values()), "failed": failed,
        "failures": tally.failed, "ok": tally.ok,
        "resumed": proxy_metric(stack, "tokenrelay_proxy_resumes_total") - resumed_before,
        "long_pauses": len(added),
        "resume_added_ms_p50": round(percentile(added, 50) * 1000, 1) if added else None,
        "resume_added_ms_p99": round(percentile(added, 99) * 1000, 1) if added else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    p.add_argument("--streams", type=int, default=200, help="streaming clients (default 200)")
    p.add_argument("--plain", type=int, default=50, help="non-streaming clients (default 50)")
    p.add_argument("--kill-every", type=float, default=10.0, help="seconds between replica kills (default 10)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="proxy workers (default 1)")
    p.add_argument("--ttft-ms", type=float, default=50.0)
    p.add_argument("--itl-ms", type=float, default=50.0)
    p.add_argument("--tokens", type=int, default=40, help="completion tokens per request (default 40)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    raise_fd_limit()
    clients = args.streams + args.plain
    stack = MockStack(args.replicas, args.ttft_ms, args.itl_ms, args.tokens, args.workers,
                      max_ongoing=max(64, clients))
    stack.start()
    try:
        stack.wait_ready()
        result = asyncio.run(run(args, stack))
    finally:
        stack.stop()
    print(json.dumps(dict(result, config=vars(args)), indent=1))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
