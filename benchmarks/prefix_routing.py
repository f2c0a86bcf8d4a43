"""Prefix-routing benchmark: does the `prefix` policy keep prompts that share a prefix together without
piling a hot prefix onto one replica? Prints, per policy, how requests spread over the replicas and how
concentrated each prefix stayed.

Runs as a script in its own process: one `python -m runtime up` stack (mock engine, free 127.0.0.1 ports)
with two deployments of the same replicas count, `pfx` (routing.policy prefix) and `p2c` (the default),
drives each with the same open-loop workload from this process's asyncio loop, reads which replica
served what from the replicas' own `requests_finished` counters (head status), and stops the stack.

    python benchmarks/prefix_routing.py                      # 4 replicas, 70% of requests on one prefix
    python benchmarks/prefix_routing.py --replicas 3 --hot 0.9 --rate 60 --duration 15

Workload: each request starts with one of `--prefixes` long "system prompts"; a fraction `--hot` of the
requests use prefix 0, the rest pick uniformly among the others. A prefix's "home share" is the share
of its requests served by the replica that served most of them: 100% is perfect affinity (best for a
prefix cache), 1/replicas is none. The hot prefix must not pile up: its home replica takes what its
load guard allows (max_imbalance over the least loaded) and the rest spills over.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.floor_server import install_uvloop  # noqa: E402
from benchmarks.http_client import Connection, build_request  # noqa: E402
from benchmarks.loadgen import raise_fd_limit  # noqa: E402
from benchmarks.stack import MockStack  # noqa: E402
from runtime.credentials import client_token  # noqa: E402
from runtime.head_client import status  # noqa: E402

log = logging.getLogger("bench")


def prompts(n_prefixes: int) -> list[str]:
    return ["System prompt %02d: you are assistant number %02d of the relay team; be exact. " % (i, i)
            for i in range(n_prefixes)]


def finished(head: str, token: str, deployment: str, keys: Optional[Path] = None) -> Counter:
    reply = status(head, token, timeout=3.0, keys=keys)
    dep = next(d for d in reply.deployments if d.name == deployment)
    return Counter({r.replica_id: r.requests_finished for r in dep.replica_list})


async def _one(port: int, body: dict[str, Any], failures: Counter, timeout: float) -> None:
    conn = Connection("127.0.0.1", port)
    try:
        rec, _ = await conn.stream(build_request("127.0.0.1", port, "/v1/completions", body), timeout)
    finally:
        conn.close()
    if not rec.ok:
        failures[rec.failure or "?"] += 1


async def drive(port: int, deployment: str, prefixes: list[str], hot: float, rate: float, duration: float,
                seed: int, timeout: float) -> tuple[list[int], Counter]:
    """Open-loop arrivals; returns the prefix index of every request in order, and failures by kind."""
    rng = random.Random(seed)
    order: list[int] = []
    failures: Counter = Counter()
    tasks = []
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    at = loop.time()
    while at < end:
        await asyncio.sleep(max(0.0, at - loop.time()))
        k = 0 if rng.random() < hot else rng.randrange(1, len(prefixes))
        order.append(k)
        body = {"model": deployment, "prompt": prefixes[k] + "question %d" % len(order), "stream": True}
        tasks.append(asyncio.ensure_future(_one(port, body, failures, timeout)))
        at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    return order, failures


def measure(stack: MockStack, token: str, deployment: str, prefix: str, ns: argparse.Namespace,
            k: int) -> tuple[Counter, int, Counter]:
    """Requests per replica for one prefix alone (sequential, so each is attributed exactly)."""
    before = finished(stack.control, token, deployment, stack.keys)
    for i in range(k):
        asyncio.run(_one(stack.port, {"model": deployment, "prompt": prefix + "probe %d" % i}, Counter(),
                         ns.timeout))
    deadline = time.monotonic() + 5
    while True:  # the head's status trails the replicas by up to ~1 s
        delta = finished(stack.control, token, deployment, stack.keys) - before
        if sum(delta.values()) >= k or time.monotonic() > deadline:
            return delta, k, Counter()
        time.sleep(0.2)


def run_policy(stack: MockStack, token: str, deployment: str, ns: argparse.Namespace) -> dict[str, Any]:
    prefixes = prompts(ns.prefixes)
    before = finished(stack.control, token, deployment, stack.keys)
    order, failures = asyncio.run(drive(stack.port, deployment, prefixes, ns.hot, ns.rate, ns.duration,
                                        ns.seed, ns.timeout))
    time.sleep(1.5)
    spread = finished(stack.control, token, deployment, stack.keys) - before
    # affinity when idle: each of a few prefixes sent alone, a few times: on how many replicas it lands
    idle = {}
    for k in range(min(4, ns.prefixes)):
        per, n, _ = measure(stack, token, deployment, prefixes[k], ns, 5)
        idle[k] = max(per.values()) / n if per else 0.0
    return {"requests": len(order), "hot_requests": order.count(0), "failures": dict(failures),
            "per_replica": dict(sorted(spread.items())), "idle_home_share": idle}


def print_policy(name: str, r: dict[str, Any], replicas: int) -> None:
    total = sum(r["per_replica"].values()) or 1
    print("== policy %s: %d requests (%d on the hot prefix), failures %s" % (
        name, r["requests"], r["hot_requests"], r["failures"] or "none"))
    shares = sorted((100.0 * v / total for v in r["per_replica"].values()), reverse=True)
    print("  share of requests per replica under load: %s  (even: %.0f%% each)" % (
        "  ".join("%.0f%%" % s for s in shares), 100.0 / replicas))
    print("  prefix sent alone 5x, share on its home replica: %s" % "  ".join(
        "p%d=%.0f%%" % (k, 100 * v) for k, v in r["idle_home_share"].items()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--max-ongoing", type=int, default=16)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prefixes", type=int, default=20)
    p.add_argument("--hot", type=float, default=0.7, help="share of requests on prefix 0")
    p.add_argument("--rate", type=float, default=80.0, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-imbalance", type=int, default=4, help="routing.max_imbalance of the prefix policy")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(message)s")
    install_uvloop()
    raise_fd_limit()
    stack = MockStack(ns.replicas, ns.ttft_ms, ns.itl_ms, ns.tokens, ns.workers, ns.max_ongoing, model="pfx")
    base = stack.config["deployments"][0]
    base["routing"] = {"policy": "prefix", "prefix_chars": 64, "max_imbalance": ns.max_imbalance}
    stack.config["deployments"].append(dict(base, name="p2c", routing={}))
    results: dict[str, Any] = {}
    try:
        stack.start()
        stack.wait_ready()
        token = client_token(None, str(stack.dir / "state"))
        deadline = time.monotonic() + 60
        while sum(1 for _ in finished(stack.control, token, "p2c", stack.keys)) < ns.replicas:
            if time.monotonic() > deadline:
                raise RuntimeError("the p2c deployment did not come up")
            time.sleep(0.5)
        print("tokenrelay prefix-routing benchmark: %d replicas x max_ongoing %d, %d prefixes, %.0f%% of "
              "requests on one, %.0f requests/s for %.0f s, prefix max_imbalance %d" % (
                  ns.replicas, ns.max_ongoing, ns.prefixes, 100 * ns.hot, ns.rate, ns.duration, ns.max_imbalance))
        for name in ("pfx", "p2c"):
            results[name] = run_policy(stack, token, name, ns)
            print_policy("prefix" if name == "pfx" else "p2c", results[name], ns.replicas)
    except RuntimeError:
        print(stack.log_tail(), file=sys.stderr)
        raise
    finally:
        stack.stop()
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
