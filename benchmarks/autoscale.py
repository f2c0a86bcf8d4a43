"""Autoscaling under a load that steps up and down: replicas over time, TTFT p90 per window, failures.

    python -m benchmarks.autoscale --phases 1:20,16:40,4:40,0:30 --cold-start-s 10 [--json out.json] [--plot out.png]
    python -m benchmarks.autoscale --min-replicas 0 --phases 0:15,2:20,0:15 --downscale-delay-s 5   # scale to zero
    python -m benchmarks.autoscale --scale-on-ttft ...   # also scale on the TTFT p90 objective

Starts a mock stack (`python -m runtime up`, benchmarks.stack.MockStack) whose deployment autoscales
(`autoscaling` block, docs/deployments.md) and whose replicas take `--cold-start-s` to start (the mock's
`startup_ms`, standing in for a real engine's start). Each phase runs N streaming clients for S seconds.
Prints, per `--window` seconds: clients, the head's desired and ready replicas, requests ok and failed,
TTFT p90 against `--ttft-objective-ms`; then, for each step up, the time from the step to the first new
replica serving. Runs in its own process; owns only HTTP client connections and short head status calls;
stops only the stack it started.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx

from benchmarks.stack import MockStack
from runtime.credentials import client_token
from runtime.head_client import HeadRefused, HeadUnreachable, status

log = logging.getLogger("bench")


@dataclass
class Record:
    started: float
    ttft: Optional[float]
    ok: bool


@dataclass
class Run:
    t0: float
    clients: int = 0
    records: list[Record] = field(default_factory=list)
    samples: list[tuple[float, int, int, int, str]] = field(default_factory=list)  # t, clients, desired, ready, why
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(index: int, run: Run, url: str, model: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            if index >= run.clients:
                time.sleep(0.05)
                continue
            started = time.monotonic()
            ttft, ok = None, False
            try:
                with http.stream("POST", url + "/v1/completions",
                                 json={"model": model, "prompt": "step", "stream": True}) as r:
                    last = ""
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            if ttft is None:
                                ttft = time.monotonic() - started
                            last = line
                    ok = r.status_code == 200 and last == "data: [DONE]"
            except httpx.HTTPError:
                ok = False
            with run.lock:
                run.records.append(Record(started - run.t0, ttft, ok))


def sampler(run: Run, stack: MockStack, model: str, stop: threading.Event) -> None:
    token = client_token(None, str(stack.dir / "state"))
    keys = None if stack.insecure else stack.dir / "state" / "keys"  # CURVE: the operator key up made
    while not stop.wait(1.0):
        try:
            reply = status(stack.control, token, timeout=1.0, keys=keys)
        except (HeadUnreachable, HeadRefused):
            continue
        dep = next((d for d in reply.deployments if d.name == model), None)
        if dep is not None:
            run.samples.append((time.monotonic() - run.t0, run.clients, dep.replicas, dep.ready_replicas,
                                dep.autoscale.reason if dep.autoscale else ""))


def p90(values: list[float]) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def windows(run: Run, width: float, objective: float) -> list[dict[str, Any]]:
    end = max([s[0] for s in run.samples] + [r.started for r in run.records] + [0.0])
    out = []
    t = 0.0
    while t < end:
        recs = [r for r in run.records if t <= r.started < t + width]
        samp = [s for s in run.samples if t <= s[0] < t + width]
        ttft = p90([r.ttft for r in recs if r.ttft is not None])
        out.append({"t": t, "clients": max((s[1] for s in samp), default=0),
                    "desired": max((s[2] for s in samp), default=0), "ready": max((s[3] for s in samp), default=0),
                    "ok": sum(r.ok for r in recs), "failed": sum(not r.ok for r in recs),
                    "ttft_p90_ms": None if ttft is None else round(ttft * 1000, 1),
                    "meets_objective": None if ttft is None else ttft * 1000 <= objective})
        t += width
    return out


def step_times(run: Run, phases: list[tuple[int, float]]) -> list[dict[str, Any]]:
    """For each step up in clients: seconds until ready replicas first exceed the count at the step."""
    out, t, prev = [], 0.0, 0
    for clients, seconds in phases:
        if clients > prev and t > 0:
            before = next((s[3] for s in reversed(run.samples) if s[0] <= t), 0)  # ready at the step
            later = [s[0] for s in run.samples if s[0] > t and s[3] > before]
            out.append({"at_s": t, "clients": clients, "ready_before": before,
                        "to_new_replica_serving_s": round(later[0] - t, 1) if later else None})
        prev, t = clients, t + seconds
    return out


def plot(run: Run, path: str, objective: float, width: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    ts = [s[0] for s in run.samples]
    top.plot(ts, [s[1] for s in run.samples], label="clients", color="tab:gray")
    top.set_ylabel("clients")
    reps = top.twinx()
    reps.step(ts, [s[2] for s in run.samples], where="post", label="desired replicas", color="tab:blue")
    reps.step(ts, [s[3] for s in run.samples], where="post", label="ready replicas", color="tab:green")
    reps.set_ylabel("replicas")
    reps.legend(loc="upper right", fontsize=8)
    rows = windows(run, width, objective)
    bottom.plot([r["t"] + width / 2 for r in rows], [r["ttft_p90_ms"] for r in rows], marker="o", label="TTFT p90")
    bottom.axhline(objective, color="tab:red", linestyle="--", label="objective")
    bottom.set_ylabel("ms")
    bottom.set_xlabel("seconds")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_phases(text: str) -> list[tuple[int, float]]:
    out = []
    for part in text.split(","):
        clients, _, seconds = part.partition(":")
        out.append((int(clients), float(seconds)))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.autoscale", description=__doc__.split("\n")[0])
    p.add_argument("--phases", default="1:20,16:40,4:40,0:30", help="clients:seconds,...")
    p.add_argument("--cold-start-s", type=float, default=10.0)
    p.add_argument("--itl-ms", type=float, default=20.0)
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--max-running", type=int, default=4,
                   help="requests one mock replica generates at once (more wait): what makes TTFT grow")
    p.add_argument("--target", type=float, default=4.0, help="autoscaling.target_ongoing_requests")
    p.add_argument("--min-replicas", type=int, default=1, help="autoscaling.min_replicas; 0: scale to zero")
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--upscale-delay-s", type=float, default=3.0)
    p.add_argument("--downscale-delay-s", type=float, default=15.0)
    p.add_argument("--ttft-objective-ms", type=float, default=500.0)
    p.add_argument("--scale-on-ttft", action="store_true",
                   help="set autoscaling.target_ttft_p90_s to the objective (else it is only reported)")
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG path (needs matplotlib)")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    phases = parse_phases(ns.phases)
    stack = MockStack(1, 20, ns.itl_ms, ns.tokens, 1, 64)
    dep = stack.config["deployments"][0]
    dep["engine_args"].update(startup_ms=ns.cold_start_s * 1000, max_running=ns.max_running)
    dep["autoscaling"] = {"min_replicas": ns.min_replicas, "max_replicas": ns.max_replicas,
                          "target_ongoing_requests": ns.target, "upscale_delay_s": ns.upscale_delay_s,
                          "downscale_delay_s": ns.downscale_delay_s}
    if ns.scale_on_ttft:
        dep["autoscaling"]["target_ttft_p90_s"] = ns.ttft_objective_ms / 1000
    if ns.min_replicas == 0:
        dep["replicas"] = 0  # starts at zero; the readiness probe's request is the first cold start
    stack.start()
    stop = threading.Event()
    try:
        stack.wait_ready(timeout=60 + ns.cold_start_s)
        run = Run(t0=time.monotonic())
        threads = [threading.Thread(target=client_loop, args=(i, run, stack.url, stack.model, stop), daemon=True)
                   for i in range(max(c for c, _ in phases))]
        threads.append(threading.Thread(target=sampler, args=(run, stack, stack.model, stop), daemon=True))
        for t in threads:
            t.start()
        for clients, seconds in phases:
            log.info("bench phase: %d client(s) for %.0fs", clients, seconds)
            run.clients = clients
            time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(70)
    finally:
        stop.set()
        stack.stop()
    rows = windows(run, ns.window, ns.ttft_objective_ms)
    steps = step_times(run, phases)
    print("%6s %7s %7s %5s %6s %6s %10s" % ("t_s", "clients", "desired", "ready", "ok", "failed", "ttft_p90"))
    for r in rows:
        print("%6.0f %7d %7d %5d %6d %6d %10s%s" % (
            r["t"], r["clients"], r["desired"], r["ready"], r["ok"], r["failed"],
            "-" if r["ttft_p90_ms"] is None else "%.0f ms" % r["ttft_p90_ms"],
            "" if r["meets_objective"] in (None, True) else "  > objective"))
    for s in steps:
        print("step to %d clients at %.0fs: new replica serving after %s s" % (
            s["clients"], s["at_s"], s["to_new_replica_serving_s"]))
    failed = sum(not r.ok for r in run.records)
    print("requests: %d ok, %d failed" % (sum(r.ok for r in run.records), failed))
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump({"windows": rows, "steps": steps, "samples": run.samples, "failed": failed}, fh, indent=1)
    if ns.plot:
        try:
            plot(run, ns.plot, ns.ttft_objective_ms, ns.window)
        except ImportError:
            log.warning("no matplotlib: no plot")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
