"""Every prometheus metric of the proxy (prefix `tokenrelay_proxy_`), and the /metrics rendering.

Runs in proxy workers; owns no socket. Under gunicorn this must be imported only after
PROMETHEUS_MULTIPROC_DIR is set (proxy/__main__ and server.run do that via config.prepare_metrics_dir);
the master only calls `mark_process_dead` from the child_exit hook.

Per-token cost: the inter-token histogram is fed through a `BatchedObservations` (a bisect and two
additions per token) and written to the shared mmap files at most once a second per worker and at the
end of every request, instead of an mmap write under a lock per token.
"""
from __future__ import annotations

import os
import time
from bisect import bisect_left
from typing import Any, Callable, Iterator, Optional

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.config import METRICS_DIR_ENV
from runtime.gc_policy import GcPauses

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           120.0, 300.0)

REQUESTS = Counter("tokenrelay_proxy_requests", "Inference requests by final HTTP status",
                   ["deployment", "status"])
IN_FLIGHT = Gauge("tokenrelay_proxy_in_flight_requests", "Requests waiting for or streaming tokens",
                  ["deployment"], multiprocess_mode="livesum")
TTFT = Histogram("tokenrelay_proxy_time_to_first_token_seconds", "Request start to first token",
                 ["deployment"], buckets=BUCKETS)
ITL = Histogram("tokenrelay_proxy_inter_token_latency_seconds", "Gap between consecutive chunks",
                ["deployment"], buckets=BUCKETS)
DURATION = Histogram("tokenrelay_proxy_request_duration_seconds", "Request start to end of response",
                     ["deployment"], buckets=BUCKETS)
QUEUE_WAIT = Histogram("tokenrelay_proxy_queue_wait_seconds",
                       "Time requests waited in the admission queue for a free replica", ["deployment"],
                       buckets=BUCKETS)
REJECTED = Counter("tokenrelay_proxy_rejected_requests",
                   "Requests refused by admission control (reject_full, reject_timeout) or the rate limit",
                   ["deployment", "reason"])
RETRIES = Counter("tokenrelay_proxy_retries", "Requests retried on another replica before the first token",
                  ["deployment"])
RESUMES = Counter("tokenrelay_proxy_resumes",
                  "Requests moved mid-stream to another replica after theirs was lost (dispatch.resume)",
                  ["deployment"])
TOKENS_REPLAYED = Counter("tokenrelay_proxy_resume_replayed_tokens",
                          "Completion tokens handed to the new replica on a resume (GenerateRequest.resume)",
                          ["deployment"])
RESUME_GAP = Histogram("tokenrelay_proxy_resume_gap_seconds",
                       "From a lost replica noticed to the first token of the replica resuming the request",
                       ["deployment"], buckets=BUCKETS)
EJECTIONS = Counter("tokenrelay_proxy_replica_ejections",
                    "Circuit breaker openings: a replica ejected after repeated failures", ["deployment"])
HANDSHAKE_FAILURES = Counter("tokenrelay_proxy_replica_handshake_failures",
                             "Failed handshakes with a replica's data socket, by kind (refused: its host "
                             "does not list this proxy's key; protocol; dropped)", ["deployment", "kind"])
ABORTS = Counter("tokenrelay_proxy_aborts",
                 "Requests the proxy aborted at the replica before they finished, by reason (client_gone, "
                 "timeout, first_token_timeout, slow_reader, error)", ["deployment", "reason"])
DIRECT_CHUNKS = Counter("tokenrelay_proxy_direct_chunks",
                        "Response chunks the replica reader wrote straight to the client socket "
                        "(direct writes)",
                        ["deployment"])
IDLE_CLOSED = Counter("tokenrelay_proxy_idle_connections_closed",
                      "Idle client connections closed to keep them within --max-idle-per-client and "
                      "--max-idle-connections")
CONNECTIONS_PARKED = Counter("tokenrelay_proxy_connections_parked",
                             "New connections from an address over --max-idle-per-client, held unserved "
                             "and closed later (proxy/gunicorn_worker.py)")
CLIENTS_STALLED = Counter("tokenrelay_proxy_clients_stalled",
                          "Connections closed because the client took none of a response write for "
                          "--send-timeout (it stopped reading)")
AUTH_FAILURES = Counter("tokenrelay_proxy_auth_failures", "Requests refused with 401 (missing or unknown key)")
TABLE_AGE = Gauge("tokenrelay_proxy_routing_table_age_seconds",
                  "Seconds since this worker last got a routing table (max over live workers)",
                  multiprocess_mode="livemax")
TABLE_REPLICAS = Gauge("tokenrelay_proxy_routing_table_replicas",
                       "Replicas of a deployment in this worker's routing table (min over live workers)",
                       ["deployment"], multiprocess_mode="livemin")
GC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
GC_PAUSE = Histogram("tokenrelay_proxy_gc_pause_seconds",
                     "Garbage-collection pauses in the proxy workers, by generation (runtime/gc_policy.py)",
                     ["generation"], buckets=GC_BUCKETS)


FLUSH_INTERVAL = 1.0  # seconds a worker may hold inter-token observations before writing them


class BatchedObservations:
    """Observations of one histogram child (one label set), kept in this process and added in bulk.

    `flush` does what `observe` does, once per bucket instead of once per value: it increments the
    child's per-bucket values (prometheus_client stores them non-cumulatively) and its sum. Those are
    the child's `_upper_bounds`, `_buckets` and `_sum`, prometheus_client's layout for years;
    tests/unit/test_proxy_metrics_batch.py checks that the exposition equals that of plain `observe`.
    """

    __slots__ = ("_child", "_bounds", "_counts", "_sum", "_n")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._n = 0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value
        self._n += 1

    def add(self, counts: list[int], total: float) -> None:
        """Observations already counted per bucket (same bounds as the child's, +inf last)."""
        for i, n in enumerate(counts):
            self._counts[i] += n
        self._sum += total
        self._n += sum(counts)

    def flush(self) -> None:
        if not self._n:
            return
        child, counts = self._child, self._counts
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)
                counts[i] = 0
        child._sum.inc(self._sum)
        self._sum = 0.0
        self._n = 0


class _ItlBatches:
    """This worker's pending inter-token observations, per deployment."""

    def __init__(self) -> None:
        self.by_deployment: dict[str, BatchedObservations] = {}
        self.next_flush = 0.0

    def get(self, deployment: str) -> BatchedObservations:
        b = self.by_deployment.get(deployment)
        if b is None:
            b = self.by_deployment[deployment] = BatchedObservations(ITL.labels(deployment))
        return b

    def flush_all(self, now: float) -> None:
        self.next_flush = now + FLUSH_INTERVAL
        for b in self.by_deployment.values():
            b.flush()
        for generation, (counts, total) in _GC_PAUSES.drain().items():
            batch = BatchedObservations(GC_PAUSE.labels(str(generation)))
            batch.add(counts, total)
            batch.flush()


_ITL_BATCHES = _ItlBatches()
_GC_PAUSES = GcPauses(GC_BUCKETS + (float("inf"),))


def watch_gc() -> None:
    """Time this worker's garbage collections from now on (GC_PAUSE, written with the inter-token
    batches: at most once a second while tokens flow, and at every scrape)."""
    _GC_PAUSES.install()


_TABLE_DEPLOYMENTS: set[str] = set()  # deployments this worker has set TABLE_REPLICAS for


def table_applied(replicas: dict[str, int]) -> None:
    """This worker applied a routing table: replicas per deployment. A deployment that left the table
    reads 0 (multiprocess gauges cannot drop a label set)."""
    for name in _TABLE_DEPLOYMENTS - replicas.keys():
        TABLE_REPLICAS.labels(name).set(0)
    for name, n in replicas.items():
        TABLE_REPLICAS.labels(name).set(n)
    _TABLE_DEPLOYMENTS.update(replicas)


def count_request(deployment: str, status: int) -> None:
    REQUESTS.labels(deployment, str(status)).inc()


class RequestTracker:
    """Latency and in-flight metrics of one routed request; `finish` is idempotent."""

    __slots__ = ("deployment", "_clock", "_start", "_last", "_itl", "_done")

    def __init__(self, deployment: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.deployment = deployment
        self._clock = clock
        self._start = clock()
        self._last = 0.0
        self._itl: Optional[BatchedObservations] = None
        self._done = False
        IN_FLIGHT.labels(deployment).inc()

    def token(self) -> float:
        """Count one token (delta) reaching the client; returns the time it was counted."""
        now = self._clock()
        if self._itl is None:
            TTFT.labels(self.deployment).observe(now - self._start)
            self._itl = _ITL_BATCHES.get(self.deployment)
        else:
            self._itl.observe(now - self._last)
            if now >= _ITL_BATCHES.next_flush:
                _ITL_BATCHES.flush_all(now)
        self._last = now
        return now

    def finish(self, status: int) -> None:
        if self._done:
            return
        self._done = True
        if self._itl is not None:
            self._itl.flush()
        IN_FLIGHT.labels(self.deployment).dec()
        DURATION.labels(self.deployment).observe(self._clock() - self._start)
        count_request(self.deployment, status)


class ProxyProcesses(Collector):
    """CPU seconds and resident memory of the gunicorn master and each of its workers, read with psutil at
    scrape time (prometheus_client's own process metrics are not available in multiprocess mode)."""

    def __init__(self, master_pid: int) -> None:
        self._master = master_pid

    def collect(self) -> Iterator[Any]:
        cpu = CounterMetricFamily("tokenrelay_proxy_cpu_seconds", "CPU seconds (user + system) of the "
                                  "proxy's gunicorn master and each worker", labels=["role", "pid"])
        rss = GaugeMetricFamily("tokenrelay_proxy_resident_memory_bytes", "Resident memory of the proxy's "
                                "gunicorn master and each worker", labels=["role", "pid"])
        try:
            master = psutil.Process(self._master)
            procs = [("master", master)] + [("worker", p) for p in master.children()]
        except psutil.Error:
            procs = []
        for role, proc in procs:
            try:
                with proc.oneshot():
                    times, mem = proc.cpu_times(), proc.memory_info().rss
            except psutil.Error:  # a worker that just exited
                continue
            cpu.add_metric([role, str(proc.pid)], times.user + times.system)
            rss.add_metric([role, str(proc.pid)], mem)
        yield cpu
        yield rss


def render() -> tuple[bytes, str]:
    """Exposition bytes for GET /metrics: all live and dead workers in multiprocess mode (then this is a
    gunicorn worker and its parent is the master), plus the CPU and memory of the master and workers."""
    _ITL_BATCHES.flush_all(time.monotonic())
    if os.environ.get(METRICS_DIR_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(ProxyProcesses(os.getppid()))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
