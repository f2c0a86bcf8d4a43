"""Closed-loop streaming load generator for OpenAI-compatible servers: a library (`run_level`) and a CLI.

Runs in its own process on one asyncio loop (uvloop when importable); every client task owns one
keep-alive TCP connection (benchmarks.http_client.Connection). It must never be the bottleneck: no
per-chunk JSON, no HTTP library, request bytes built once, one record per request written at its end.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --endpoint chat --concurrency 1,16,64 \
        --ramp 2 --duration 20 --max-tokens 64 --out results/sweep.json --plot results/sweep.png
    python benchmarks/loadgen.py --self-test      # the generator's own ceiling, against an in-process floor

Clients start evenly over `--ramp` seconds; requests that start during the ramp are reported apart. The
run then measures `--duration` seconds (or `--requests` measured requests) and waits for the requests in
flight to finish. benchmarks.stats says which requests count for latency and which for throughput.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import resource
import sys
import time
from array import array
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.floor_server import install_uvloop  # noqa: E402
from benchmarks.http_client import Connection, build_request  # noqa: E402
from benchmarks.stats import RequestRecord, format_summary, summarize  # noqa: E402

log = logging.getLogger("loadgen")

DEFAULT_PROMPT = "Tell me a story about relays and replicas"
Hook = Callable[[], None]


@dataclass(frozen=True)
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    endpoint: str = "completions"        # completions | chat
    model: str = "mock"
    max_tokens: Optional[int] = None
    prompt: str = DEFAULT_PROMPT
    concurrency: int = 16
    ramp: float = 0.0                    # seconds over which clients start
    duration: Optional[float] = 10.0     # measured seconds after the ramp (None: use `requests`)
    requests: Optional[int] = None       # measured requests, when duration is None
    think: float = 0.0                   # seconds a client waits between its requests
    timeout: float = 60.0                # per request, connect to last byte
    include_usage: bool = True
    progress: float = 5.0                # seconds between progress log lines (0: none)

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError("--endpoint: must be completions or chat, got %r" % self.endpoint)
        if self.concurrency < 1:
            raise ValueError("--concurrency: must be >= 1")
        if (self.duration is None) == (self.requests is None):
            raise ValueError("--duration / --requests: give exactly one")
        if self.ramp < 0 or self.think < 0 or self.timeout <= 0:
            raise ValueError("--ramp, --think must be >= 0 and --timeout > 0")

    def target(self) -> tuple[str, int, str]:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("--url: only http://host[:port] is supported, got %r" % self.url)
        base = parts.path.rstrip("/")
        for suffix in ("/v1/completions", "/v1/chat/completions", "/v1"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
                break
        path = base + ("/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions")
        return parts.hostname, parts.port or 80, path

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "stream": True}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        return body


class _Run:
    """State shared by the client tasks of one level (single event loop, so no locks)."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        host, port, path = cfg.target()
        self.host, self.port = host, port
        self.request = build_request(host, port, path, cfg.body())
        self.records: list[RequestRecord] = []
        self.gaps = array("d")
        self.t0 = time.perf_counter()
        self.window_start = self.t0 + cfg.ramp
        self.window_end = self.window_start + cfg.duration if cfg.duration is not None else None
        self.issued = 0  # measured requests started (requests mode)
        self.cpu_start: Optional[float] = None
        self.cpu_used: Optional[float] = None

    def _may_start(self) -> bool:
        now = time.perf_counter()
        if self.window_end is not None:
            return now < self.window_end
        if now < self.window_start:
            return True
        if self.issued >= (self.cfg.requests or 0):
            return False
        self.issued += 1
        return True

    async def client(self, index: int) -> None:
        cfg = self.cfg
        if cfg.ramp:
            await asyncio.sleep(cfg.ramp * index / cfg.concurrency)
        conn = Connection(self.host, self.port)
        try:
            while self._may_start():
                rec, gaps = await conn.stream(self.request, cfg.timeout)
                rec.ramp = rec.start < self.window_start
                self.records.append(rec)
                if rec.ok and not rec.ramp:
                    self.gaps.extend(gaps)
                if rec.failure == "connect":
                    await asyncio.sleep(0.05)  # a refused connect returns at once: do not spin
                if cfg.think:
                    await asyncio.sleep(cfg.think)
        finally:
            conn.close()

    async def progress(self) -> None:
        seen = 0
        while True:
            await asyncio.sleep(self.cfg.progress)
            recs = self.records[seen:]
            seen += len(recs)
            failed = sum(1 for r in recs if not r.ok)
            log.info("loadgen [progress] t=%.0fs %d requests done (%d failed), %.0f tokens/s",
                     time.perf_counter() - self.t0, len(recs), failed,
                     sum(r.tokens for r in recs) / self.cfg.progress)

    async def window_hooks(self, on_start: Optional[Hook], on_end: Optional[Hook]) -> None:
        await asyncio.sleep(max(0.0, self.window_start - time.perf_counter()))
        self.cpu_start = time.process_time()
        if on_start:
            on_start()
        if self.window_end is not None:
            await asyncio.sleep(max(0.0, self.window_end - time.perf_counter()))
            self.window_closed(on_end)

    def window_closed(self, on_end: Optional[Hook]) -> None:
        """Once per run: note the generator's own CPU use over the window (to show it was not the
        bottleneck) and run the end hook, if the window has started."""
        if self.cpu_start is not None and self.cpu_used is None:
            self.cpu_used = time.process_time() - self.cpu_start
            if on_end:
                on_end()


async def run_level(cfg: LoadConfig, on_window_start: Optional[Hook] = None,
                    on_window_end: Optional[Hook] = None) -> dict[str, Any]:
    """Run one concurrency level; returns {"concurrency", "summary", "events"} (see benchmarks.stats).

    The hooks run on the loop at the window's start and end (in requests mode the end hook runs when
    the last client finished), e.g. to sample a server's CPU time.
    """
    run = _Run(cfg)
    helpers = [asyncio.ensure_future(run.window_hooks(on_window_start, on_window_end))]
    if cfg.progress:
        helpers.append(asyncio.ensure_future(run.progress()))
    try:
        await asyncio.gather(*(run.client(i) for i in range(cfg.concurrency)))
    finally:
        run.window_closed(on_window_end)  # requests mode, or every client ended before the end timer
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    summary = summarize(run.records, run.gaps, run.window_start, run.window_end)
    if run.cpu_used is not None:
        # CPU seconds of this whole process per second of window: near 1.0 means the generator saturates
        summary["loadgen_cpu_util"] = round(run.cpu_used / max(summary["window_s"], 1e-9), 3)
    return {"concurrency": cfg.concurrency, "summary": summary,
            "events": sum(r.events for r in run.records)}


def raise_fd_limit() -> None:
    """Each client holds a socket: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, 65536) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Closed-loop streaming load generator (OpenAI API).")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--model", default="mock")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--concurrency", default="16", help="clients, or a comma list to sweep: 1,16,64")
    p.add_argument("--ramp", type=float, default=0.0, help="seconds over which clients start")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, default=None, help="measured seconds after the ramp")
    stop.add_argument("--requests", type=int, default=None, help="measured requests (instead of --duration)")
    p.add_argument("--think", type=float, default=0.0, help="seconds between a client's requests")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--no-usage", action="store_true", help="do not ask for the usage chunk")
    p.add_argument("--progress", type=float, default=5.0, help="seconds between progress lines (0: none)")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--plot", help="write a PNG of latency and throughput against concurrency")
    p.add_argument("--self-test", action="store_true", help="measure the generator's own ceiling")
    p.add_argument("--log-level", default="INFO")
    return p


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError("--concurrency: expected integers like 1,16,64, got %r" % text) from None
    if not levels or min(levels) < 1:
        raise ValueError("--concurrency: every level must be >= 1")
    return levels


def main(argv: Optional[list[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(message)s")
    uv = install_uvloop()
    raise_fd_limit()
    if ns.self_test:
        from benchmarks.selftest import print_self_test, self_test
        print_self_test(self_test())
        return 0
    try:
        levels = parse_levels(ns.concurrency)
        base = LoadConfig(url=ns.url, endpoint=ns.endpoint, model=ns.model, max_tokens=ns.max_tokens,
                          prompt=ns.prompt, concurrency=levels[0], ramp=ns.ramp,
                          duration=None if ns.requests else (ns.duration or 10.0), requests=ns.requests,
                          think=ns.think, timeout=ns.timeout, include_usage=not ns.no_usage,
                          progress=ns.progress)
        base.target()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    results = []
    for level in levels:
        cfg = replace(base, concurrency=level)
        log.info("loadgen [start] %d clients -> %s (%s)", level, cfg.url, "uvloop" if uv else "asyncio")
        result = asyncio.run(run_level(cfg))
        results.append(result)
        print("== concurrency %d" % level)
        print(format_summary(result["summary"], "  "))
    if len(results) > 1:
        print("%8s %9s %10s %10s %10s %10s %10s" % ("clients", "req/s", "tokens/s", "ttft p50", "ttft p99",
                                                    "itl p99", "failed"))
        for r in results:
            s = r["summary"]
            print("%8d %9.1f %10.0f %10s %10s %10s %10d" % (
                r["concurrency"], s["rps"], s["output_tokens_per_s"], s["ttft_ms"]["p50"],
                s["ttft_ms"]["p99"], s["itl_ms"]["p99"], s["requests"]["failed"]))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        config = asdict(base)
        config["concurrency"] = levels
        Path(ns.out).write_text(json.dumps({
            "config": config, "event_loop": "uvloop" if uv else "asyncio",
            "python": platform.python_version(), "levels": results}, indent=2))
        log.info("loadgen [done] wrote %s", ns.out)
    if ns.plot:
        from benchmarks.plot import plot_levels
        plot_levels(results, ns.plot, "%s %s" % (ns.url, ns.endpoint))
        log.info("loadgen [done] wrote %s", ns.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
