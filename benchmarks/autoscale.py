"""Autoscaling under a load that steps up and down: replicas over time, TTFT p90 per window, failures.

    python -m benchmarks.autoscale --phases 1:20,16:40,4:40,0:30 --cold-start-s 10 [--json out.json] [--plot out.png]
    python -m benchmarks.autoscale --min-replicas 0 --phases 0:15,2:20,0:15 --downscale-delay-s 5   # scale to zero
    python -m benchmarks.autoscale --scale-on-ttft ...   # also scale on the TTFT p90 objective
    python -m benchmarks.autoscale --engine vllm [--plot out.png]   # SmolLM2, 1 -> 2 replicas, ~5 min
    python -m benchmarks.autoscale --replot out.json --plot out.png   # redraw a saved run

`--engine mock` (default): a mock stack (`python -m runtime up`, benchmarks.stack.MockStack) whose replicas
take `--cold-start-s` to start (the mock's `startup_ms`, standing in for a real engine's start).
`--engine vllm`: the default stack's deployment (`tokenrelay up` with no config: SmolLM2-135M from the local
package, prepared once into the model cache, no hub), vLLM replicas sharing the host's cores (the agent
re-divides them when a replica comes or goes). Either way the deployment autoscales (`autoscaling` block,
docs/deployments.md) and each phase runs N streaming clients for S seconds.
Prints, per `--window` seconds: clients, the head's desired and ready replicas, requests ok and failed,
TTFT p90 against `--ttft-objective-ms`; then, for each step up, the time from the step to the first new
replica serving. Runs in its own process; owns only HTTP client connections and short head status calls;
stops only the stack it started.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
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

# What each engine's run uses unless the command line says otherwise.
ENGINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mock": {"phases": "1:20,16:40,4:40,0:30", "target": 4.0, "max_replicas": 4, "downscale_delay_s": 15.0,
             "ttft_objective_ms": 500.0, "ready_timeout_s": 60.0},
    # 1 client wants 1 replica, 4 want ceil(4 / 2) = 2; the 4-client phase outlasts two cold starts (the new
    # replica, then the old one restarting on one core), the 1-client phase the downscale delay.
    "vllm": {"phases": "1:30,4:180,1:60", "target": 2.0, "max_replicas": 2, "downscale_delay_s": 20.0,
             "ttft_objective_ms": 500.0, "ready_timeout_s": 300.0},
}
MOCK_ONLY = ("cold_start_s", "itl_ms", "tokens", "max_running")
VLLM_PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"


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
    # t, clients, desired, ready, why, ids of the ready replicas
    samples: list[tuple[float, int, int, int, str, list[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(index: int, run: Run, url: str, body: dict[str, Any], stop: threading.Event) -> None:
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            if index >= run.clients:
                time.sleep(0.05)
                continue
            started = time.monotonic()
            ttft, ok = None, False
            try:
                with http.stream("POST", url + "/v1/completions", json=body) as r:
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
            ready = sorted(r.replica_id for r in dep.replica_list if r.state == "ready")
            run.samples.append((time.monotonic() - run.t0, run.clients, dep.replicas, dep.ready_replicas,
                                dep.autoscale.reason if dep.autoscale else "", ready))


def p90(values: list[float]) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def windows(run: Run, width: float, objective: float, end: Optional[float] = None) -> list[dict[str, Any]]:
    """Per `width` seconds up to `end` (the phases' end; default: the last sample or request): clients,
    desired and ready replicas (the most seen in the window), requests started ok and failed, TTFT p90."""
    if end is None:
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
    """For each step up in clients: seconds until a replica that was not ready at the step first is
    (by replica id: on a CPU host an old replica restarts on fewer cores when the new one is ready, so
    the ready count alone can stay flat), and until the ready count first exceeds the count at the step
    (every replica serving)."""
    out, t, prev = [], 0.0, 0
    for clients, seconds in phases:
        if clients > prev and t > 0:
            at = next((s for s in reversed(run.samples) if s[0] <= t), None)  # the last sample before the step
            before, ids = (at[3], set(at[5])) if at is not None else (0, set())
            later = [s for s in run.samples if s[0] > t]
            new = next((s[0] for s in later if set(s[5]) - ids), None)
            more = next((s[0] for s in later if s[3] > before), None)
            out.append({"at_s": t, "clients": clients, "ready_before": before,
                        "to_new_replica_serving_s": None if new is None else round(new - t, 1),
                        "to_more_replicas_serving_s": None if more is None else round(more - t, 1)})
        prev, t = clients, t + seconds
    return out


def plot_series(samples: list[Any], rows: list[dict[str, Any]], phases: list[tuple[int, float]],
                width: float, objective: float, steps: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """What the PNG shows, as plain lists (benchmarks.plot.plot_autoscale draws them): the load as a step
    function of the phases, the head's desired and ready replicas per sample (`Run.samples`), per window
    (`windows`) its middle, TTFT p90 (NaN where nothing started) and failed requests, and when a new
    replica first served after each step up (`step_times`)."""
    load_t, load_n, t = [], [], 0.0
    for clients, seconds in phases:
        load_t.append(t)
        load_n.append(clients)
        t += seconds
    load_t.append(t)
    load_n.append(phases[-1][0] if phases else 0)
    return {"load_t": load_t, "load_clients": load_n,
            "sample_t": [s[0] for s in samples], "desired": [s[2] for s in samples],
            "ready": [s[3] for s in samples],
            "window_mid": [r["t"] + width / 2 for r in rows],
            "ttft_p90_ms": [math.nan if r["ttft_p90_ms"] is None else r["ttft_p90_ms"] for r in rows],
            "failed": [r["failed"] for r in rows], "objective_ms": objective, "phase_starts": load_t[1:-1],
            "new_replica_t": [s["at_s"] + s["to_new_replica_serving_s"] for s in steps or []
                              if s.get("to_new_replica_serving_s") is not None]}


def draw(result: dict[str, Any], path: str) -> None:
    """The PNG of a result (what --json writes), so --replot redraws a saved run without running it again."""
    from benchmarks.plot import plot_autoscale

    phases = [(int(c), float(s)) for c, s in result["phases"]]
    series = plot_series(result["samples"], result["windows"], phases, result["window_s"],
                         result["ttft_objective_ms"], result.get("steps"))
    plot_autoscale(series, path, result["title"])


def parse_phases(text: str) -> list[tuple[int, float]]:
    """"1:20,16:40" -> [(1, 20.0), (16, 40.0)]; ValueError naming --phases on anything else."""
    out = []
    for part in text.split(","):
        clients, sep, seconds = part.partition(":")
        try:
            phase = (int(clients), float(seconds))
        except ValueError:
            phase = (-1, -1.0)
        if not sep or phase[0] < 0 or not phase[1] > 0:
            raise ValueError("--phases: each phase is CLIENTS:SECONDS (clients >= 0, seconds > 0), got %r" % part)
        out.append(phase)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.autoscale", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--engine", choices=sorted(ENGINE_DEFAULTS), default="mock",
                   help="mock: mock replicas with --cold-start-s; vllm: the default stack's SmolLM2 deployment")
    p.add_argument("--phases", default=None, help="clients:seconds,... (default: per engine, see ENGINE_DEFAULTS)")
    p.add_argument("--cold-start-s", type=float, default=None, help="mock only: a replica's start (default 10)")
    p.add_argument("--itl-ms", type=float, default=None, help="mock only (default 20)")
    p.add_argument("--tokens", type=int, default=None, help="mock only: tokens per request (default 50)")
    p.add_argument("--max-running", type=int, default=None,
                   help="mock only: requests one replica generates at once (more wait): what makes TTFT grow "
                        "(default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="vllm only: tokens per request (greedy)")
    p.add_argument("--target", type=float, default=None, help="autoscaling.target_ongoing_requests")
    p.add_argument("--min-replicas", type=int, default=1, help="autoscaling.min_replicas; 0: scale to zero")
    p.add_argument("--max-replicas", type=int, default=None)
    p.add_argument("--upscale-delay-s", type=float, default=3.0)
    p.add_argument("--downscale-delay-s", type=float, default=None)
    p.add_argument("--ttft-objective-ms", type=float, default=None)
    p.add_argument("--scale-on-ttft", action="store_true",
                   help="set autoscaling.target_ttft_p90_s to the objective (else it is only reported)")
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG path (needs matplotlib: the bench extra)")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="no run: draw --plot from a result that --json saved")
    return p


def resolve(ns: argparse.Namespace) -> argparse.Namespace:
    """Fill what the command line left unset from the engine's defaults; ValueError for a mock-only option
    given with --engine vllm (it would otherwise be silently ignored)."""
    if ns.engine != "mock":
        given = ["--" + name.replace("_", "-") for name in MOCK_ONLY if getattr(ns, name) is not None]
        if given:
            raise ValueError("%s: mock engine only (not with --engine %s)" % (", ".join(given), ns.engine))
    defaults = dict(ENGINE_DEFAULTS[ns.engine], cold_start_s=10.0, itl_ms=20.0, tokens=50, max_running=4)
    out = argparse.Namespace(**vars(ns))
    for name, value in defaults.items():
        if getattr(out, name, None) is None:
            setattr(out, name, value)
    return out


def make_stack(ns: argparse.Namespace) -> tuple[MockStack, dict[str, Any]]:
    """The stack to start (its autoscaling block from the options) and the request body clients send."""
    if ns.engine == "mock":
        stack = MockStack(1, 20, ns.itl_ms, ns.tokens, 1, 64)
        mock: Any = stack.config["deployments"]
        dep = mock[0]
        dep["engine_args"].update(startup_ms=ns.cold_start_s * 1000, max_running=ns.max_running)
        body: dict[str, Any] = {"model": stack.model, "prompt": "step", "stream": True}
    else:
        from runtime.stack_commands import DEFAULT_STACK  # the deployment `tokenrelay up` serves with no config

        default: Any = DEFAULT_STACK["deployments"]
        dep = copy.deepcopy(default[0])
        stack = MockStack(1, 0, 0, 0, 1, 64, model=dep["name"])
        stack.config["deployments"] = [dep]
        body = {"model": stack.model, "prompt": VLLM_PROMPT, "stream": True, "max_tokens": ns.max_tokens,
                "temperature": 0.0}
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the replicas inherit it: never ask a model hub
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    dep["autoscaling"] = {"min_replicas": ns.min_replicas, "max_replicas": ns.max_replicas,
                          "target_ongoing_requests": ns.target, "upscale_delay_s": ns.upscale_delay_s,
                          "downscale_delay_s": ns.downscale_delay_s}
    if ns.scale_on_ttft:
        dep["autoscaling"]["target_ttft_p90_s"] = ns.ttft_objective_ms / 1000
    if ns.min_replicas == 0:
        dep["replicas"] = 0  # starts at zero; the readiness probe's request is the first cold start
    return stack, body


def drive(stack: MockStack, body: dict[str, Any], phases: list[tuple[int, float]], ready_timeout: float) -> Run:
    """Start the stack, run the phases, stop it; the records and head samples of the run."""
    stack.start()
    stop = threading.Event()
    try:
        stack.wait_ready(timeout=ready_timeout)
        run = Run(t0=time.monotonic())
        threads = [threading.Thread(target=client_loop, args=(i, run, stack.url, body, stop), daemon=True)
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
    return run


def report(run: Run, rows: list[dict[str, Any]], steps: list[dict[str, Any]]) -> None:
    print("%6s %7s %7s %5s %6s %6s %10s" % ("t_s", "clients", "desired", "ready", "ok", "failed", "ttft_p90"))
    for r in rows:
        print("%6.0f %7d %7d %5d %6d %6d %10s%s" % (
            r["t"], r["clients"], r["desired"], r["ready"], r["ok"], r["failed"],
            "-" if r["ttft_p90_ms"] is None else "%.0f ms" % r["ttft_p90_ms"],
            "" if r["meets_objective"] in (None, True) else "  > objective"))
    for s in steps:
        print("step to %d clients at %.0fs: a new replica serving after %s s, more than %d serving after %s s"
              % (s["clients"], s["at_s"], s["to_new_replica_serving_s"], s["ready_before"],
                 s["to_more_replicas_serving_s"]))
    print("requests: %d ok, %d failed" % (sum(r.ok for r in run.records), sum(not r.ok for r in run.records)))


def title_of(ns: argparse.Namespace, phases: list[tuple[int, float]]) -> str:
    return "%s: %s clients, target %g ongoing/replica, max %d replicas" % (
        "SmolLM2 (vLLM)" if ns.engine == "vllm" else "mock, cold start %gs" % ns.cold_start_s,
        " -> ".join(str(c) for c, _ in phases), ns.target, ns.max_replicas)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        ns = resolve(parser.parse_args(argv))
        phases = parse_phases(ns.phases)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if ns.replot:
        if not ns.plot:
            parser.error("--replot needs --plot (the PNG to write)")
        with open(ns.replot) as fh:
            draw(json.load(fh), ns.plot)
        return 0
    stack, body = make_stack(ns)
    load_before = os.getloadavg()
    run = drive(stack, body, phases, ns.ready_timeout_s + (ns.cold_start_s if ns.engine == "mock" else 0))
    load_after = os.getloadavg()
    rows = windows(run, ns.window, ns.ttft_objective_ms, end=sum(s for _, s in phases))
    steps = step_times(run, phases)
    report(run, rows, steps)
    print("load average (1/5/15 min) before %.2f/%.2f/%.2f, after %.2f/%.2f/%.2f; %d cores"
          % (load_before + load_after + (os.cpu_count() or 0,)))
    failed = sum(not r.ok for r in run.records)
    result = {"engine": ns.engine, "title": title_of(ns, phases), "phases": phases, "window_s": ns.window,
              "ttft_objective_ms": ns.ttft_objective_ms, "windows": rows, "steps": steps,
              "samples": run.samples, "failed": failed, "load_average": [load_before, load_after]}
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if ns.plot:
        try:
            draw(result, ns.plot)
            log.info("bench plot: %s", ns.plot)
        except ImportError:
            log.warning("no matplotlib (pip install -e '.[bench]'): no plot")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
