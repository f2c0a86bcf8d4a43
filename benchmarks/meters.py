"""What the benchmarks measure a running stack with: CPU (per process tree, per process, per main
thread), resident memory, the proxy's GC pauses and the replicas' TokenBatch counters.

Runs in the benchmark process, from its event loop's window hooks (a few psutil calls and short HTTP
polls to 127.0.0.1: milliseconds). Every meter has start()/stop() (or idle()/loaded()) around the
measured window; each only reads.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

import psutil

from benchmarks.stack import http

if TYPE_CHECKING:
    from benchmarks.stack import MockStack

log = logging.getLogger("bench")

V = TypeVar("V")


def per_process(roots: list[psutil.Process], read: Callable[[psutil.Process], V],
                trees: bool = True) -> dict[tuple[int, float], V]:
    """`read(proc)` for every process of the roots' trees (`trees=False`: the roots alone), each once,
    keyed by (pid, create_time): a recycled PID is not the old process, and roots that contain each other
    are not counted twice."""
    out: dict[tuple[int, float], V] = {}
    for root in roots:
        try:
            procs = [root] + (root.children(recursive=True) if trees else [])
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                out[(proc.pid, proc.create_time())] = read(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    return out


class CpuMeter:
    """CPU seconds (user + system) used by a set of process trees between `start()` and `stop()`.

    Processes are cached by (pid, create_time), so a recycled PID is not mistaken for the old process;
    one that starts during the window counts from zero, one that exits during it is lost (and logged).
    """

    def __init__(self, roots: Callable[[], list[psutil.Process]], trees: bool = True,
                 overlaps: bool = False) -> None:
        self._roots = roots
        self._trees = trees  # False: the roots alone, not their children
        self.overlaps = overlaps  # True: a part of what another meter counts; never add the two up
        self._before: dict[tuple[int, float], float] = {}
        self.seconds: Optional[float] = None
        self.processes = 0

    def _sample(self) -> dict[tuple[int, float], float]:
        def cpu(proc: psutil.Process) -> float:
            t = proc.cpu_times()
            return t.user + t.system
        return per_process(self._roots(), cpu, self._trees)

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> None:
        after = self._sample()
        gone = set(self._before) - set(after)
        if gone:
            log.warning("bench [cpu] %d process(es) exited during the window; their CPU time is lost",
                        len(gone))
        self.seconds = sum(cpu - self._before.get(key, 0.0) for key, cpu in after.items())
        self.processes = len(after)


class MainThreadCpu:
    """CPU seconds (user + system) of the main thread of each process `procs()` gives (not its other
    threads, not its children), between `start()` and `stop()`: the thread that runs a server's event
    loop, which bounds what one front-end process can serve. `overlaps`: these seconds are also in a
    CpuMeter of the same process, so they are never added to one."""

    overlaps = True

    def __init__(self, procs: Callable[[], list[psutil.Process]]) -> None:
        self._procs = procs
        self._before: dict[tuple[int, float], float] = {}
        self.seconds: Optional[float] = None

    def _sample(self) -> dict[tuple[int, float], float]:
        def main_thread(proc: psutil.Process) -> float:
            return next((t.user_time + t.system_time for t in proc.threads() if t.id == proc.pid), 0.0)
        return per_process(self._procs(), main_thread, trees=False)

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> None:
        after = self._sample()
        self.seconds = sum(cpu - self._before.get(key, 0.0) for key, cpu in after.items())


def stack_cpu_meters(stack: "MockStack") -> dict[str, CpuMeter]:
    """CPU meters for the three parts of a stack: the proxy tree, the control plane (launcher, head,
    agent: each process alone) and the replicas' trees. "Everything tokenrelay runs except the
    replicas" is proxy + control."""
    return {"proxy": CpuMeter(stack.proxy_roots), "control": CpuMeter(stack.control_procs, trees=False),
            "replicas": CpuMeter(stack.replica_roots)}


class ReplicaCounters:
    """Replica-side counters between `start()` and `stop()`, summed over every replica the head lists in
    its Prometheus SD file: TokenBatch messages sent (each one a message the proxy receives) and tokens
    generated. Their ratio says how well a replica coalesces tokens per message."""

    NAMES = {"tokenrelay_replica_token_batches_total": "token_batches",
             "tokenrelay_replica_generated_tokens_total": "generated_tokens"}

    def __init__(self, sd_file: Path) -> None:
        self._sd_file = sd_file
        self._before: Optional[dict[str, float]] = None
        self.delta: Optional[dict[str, float]] = None

    def _urls(self) -> list[str]:
        try:
            entries = json.loads(self._sd_file.read_text())
        except (OSError, ValueError):
            return []
        return ["http://%s/metrics" % t for e in entries if e.get("labels", {}).get("role") == "replica"
                for t in e.get("targets", [])]

    def _sample(self) -> Optional[dict[str, float]]:
        totals = dict.fromkeys(self.NAMES.values(), 0.0)
        urls = self._urls()
        for url in urls:
            status, body = http("GET", url)
            if status != 200:
                return None
            for line in body.decode(errors="replace").splitlines():
                name, _, value = line.partition(" ")
                key = self.NAMES.get(name.split("{", 1)[0])
                if key is not None and not line.startswith("#"):
                    totals[key] += float(value)
        return totals if urls else None

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> None:
        after = self._sample()
        if after is None or self._before is None:
            log.warning("bench [replicas] could not read the replicas' counters; no tokens per message")
            return
        self.delta = {k: after[k] - self._before[k] for k in after}


class RssMeter:
    """Resident memory (bytes) of a set of process trees: `idle()` before the load, `loaded()` at the end
    of the measured window; `per_stream(n)` is what each of n open streams added (bytes)."""

    def __init__(self, roots: Callable[[], list[psutil.Process]]) -> None:
        self._roots = roots
        self.idle_bytes: Optional[int] = None
        self.loaded_bytes: Optional[int] = None

    def _sample(self) -> int:
        """Summed RSS, each process once: the roots may include each other's children (the proxy's
        roots are the gunicorn master and its workers, whose titles both say proxy)."""
        return sum(per_process(self._roots(), lambda proc: proc.memory_info().rss).values())

    def idle(self) -> None:
        self.idle_bytes = self._sample()

    def loaded(self) -> None:
        self.loaded_bytes = self._sample()

    def per_stream(self, streams: int) -> Optional[float]:
        if self.idle_bytes is None or self.loaded_bytes is None or streams <= 0:
            return None
        return (self.loaded_bytes - self.idle_bytes) / streams


GC_PAUSE = "tokenrelay_proxy_gc_pause_seconds"


def gc_pauses(metrics_text: str) -> dict[str, tuple[float, float]]:
    """{generation: (collections, seconds)} from a proxy's /metrics exposition."""
    out: dict[str, list[float]] = {}
    for line in metrics_text.splitlines():
        if not line.startswith(GC_PAUSE + "_count{") and not line.startswith(GC_PAUSE + "_sum{"):
            continue
        name, _, value = line.rpartition(" ")
        generation = name.split('generation="', 1)[1].split('"', 1)[0]
        pair = out.setdefault(generation, [0.0, 0.0])
        pair[0 if "_count{" in name else 1] += float(value)
    return {g: (v[0], v[1]) for g, v in out.items()}


class GcMeter:
    """The proxy's GC pauses (tokenrelay_proxy_gc_pause_seconds, read from /metrics) between `start()`
    and `stop()`: {generation: (collections, seconds)}."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._before: dict[str, tuple[float, float]] = {}
        self.delta: Optional[dict[str, tuple[float, float]]] = None

    def _sample(self) -> Optional[dict[str, tuple[float, float]]]:
        status, body = http("GET", self._url + "/metrics", timeout=5.0)
        return gc_pauses(body.decode(errors="replace")) if status == 200 else None

    def start(self) -> None:
        self._before = self._sample() or {}

    def stop(self) -> None:
        after = self._sample()
        if after is None:
            return
        self.delta = {g: (n - self._before.get(g, (0.0, 0.0))[0], s - self._before.get(g, (0.0, 0.0))[1])
                      for g, (n, s) in sorted(after.items())}


def per_1k_tokens(cpu_seconds: Optional[float], tokens: float) -> Optional[float]:
    """CPU seconds per 1,000 streamed tokens (None when nothing was measured)."""
    if cpu_seconds is None or tokens <= 0 or math.isnan(tokens):
        return None
    return round(cpu_seconds * 1000.0 / tokens, 4)
