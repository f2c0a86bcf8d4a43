"""Every prometheus metric of the agent (prefix `tokenrelay_agent_`): replica states, CPU, memory, GPUs.

Runs in the agent process. The agent's loop calls `AgentMetrics.update(now, records, registered)` every
step (sampled here at most once per SAMPLE_INTERVAL), `hello(msg)` for each ReplicaHello, and reads
`report(...)` / `usage()` into its heartbeats. A sample reads /proc through cached `psutil.Process`
objects (the children of each replica are re-listed only every CHILDREN_INTERVAL, since vLLM starts its
engine-core and worker processes late) and NVML when `pynvml` is importable and a driver answers; it then
swaps an immutable `Snapshot` in. The exporter thread (runtime.metrics_http) renders only that snapshot.
Owns the /metrics listener (through runtime.metrics_http); never signals or waits on a process.

  name                                             type     labels                      meaning
  tokenrelay_agent_replicas                        gauge    state                       replicas by state
  tokenrelay_agent_replica_state                   gauge    replica, deployment, state  1 for the current state
  tokenrelay_agent_replica_restarts_total          counter  replica, deployment         restarts by this agent
  tokenrelay_agent_replica_cpu_seconds_total       counter  replica, deployment         CPU of the process tree
  tokenrelay_agent_replica_resident_memory_bytes   gauge    replica, deployment         RSS of the process tree
  tokenrelay_agent_replica_processes               gauge    replica, deployment         processes in the tree
  tokenrelay_agent_gpu_utilization_ratio           gauge    gpu                         NVML busy share, 0-1
  tokenrelay_agent_gpu_memory_used_bytes           gauge    gpu                         NVML memory used
  tokenrelay_agent_gpu_memory_total_bytes          gauge    gpu                         NVML memory total
  tokenrelay_agent_head_connected                  gauge                                1 while registered
  tokenrelay_agent_auth_refused_total              counter  role, reason                refused connections
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import msgspec
import psutil
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime import metrics_http
from runtime.protocol import AgentUsage, GpuUsage, ReplicaHello, ReplicaReport

log = logging.getLogger(__name__)

PREFIX = "tokenrelay_agent_"
SAMPLE_INTERVAL = 1.0  # seconds between /proc and NVML samples
CHILDREN_INTERVAL = 5.0  # seconds between re-listing a replica's child processes
STATES = ("starting", "ready", "unhealthy", "backoff", "stopping", "failed")


# --------------------------------------------------------------------------- process trees


class TreeSampler:
    """CPU and RSS of one process tree through cached psutil.Process objects.

    `cpu_seconds` only grows: each process contributes the CPU time it gained since the last sample, so
    a restarted replica (new PID) or an exited child never makes the counter go backwards.
    """

    def __init__(self, children: bool = True) -> None:
        self.children = children  # False: the root process alone
        self.pid = 0
        self.procs: dict[tuple[int, float], psutil.Process] = {}
        self.last_cpu: dict[tuple[int, float], float] = {}
        self.cpu_seconds = 0.0
        self.rss_bytes = 0
        self.cpu_percent = 0.0
        self._listed_at = float("-inf")
        self._sampled_at: Optional[float] = None

    def sample(self, pid: int, now: float) -> None:
        if pid != self.pid:
            self.pid, self.procs, self._listed_at = pid, {}, float("-inf")
        if pid and now - self._listed_at >= CHILDREN_INTERVAL:
            self._list(pid)
            self._listed_at = now
        gained, rss, alive = 0.0, 0, {}
        for key, proc in self.procs.items():
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    mem = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            cpu = t.user + t.system
            gained += max(0.0, cpu - self.last_cpu.get(key, 0.0))  # a new process: all it has used
            self.last_cpu[key] = cpu
            rss += mem
            alive[key] = proc
        self.procs = alive
        self.last_cpu = {k: v for k, v in self.last_cpu.items() if k in alive}
        self.cpu_seconds += gained
        self.rss_bytes = rss
        if self._sampled_at is not None and now > self._sampled_at:
            self.cpu_percent = 100.0 * gained / (now - self._sampled_at)
        self._sampled_at = now

    def _list(self, pid: int) -> None:
        try:
            root = psutil.Process(pid)
            found = [root] + (root.children(recursive=True) if self.children else [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self.procs = {}
            return
        for proc in found:
            try:
                key = (proc.pid, proc.create_time())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.procs.setdefault(key, proc)  # keep the cached object (psutil caches per object)


# --------------------------------------------------------------------------- GPUs


class GpuSampler:
    """NVML utilisation and memory per GPU; disabled (no GPUs) when pynvml or the driver is missing."""

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml
        self._handles: list[tuple[int, Any]] = []
        if nvml is None:
            try:
                import pynvml as nvml  # type: ignore[import-not-found, no-redef, unused-ignore]
            except ImportError:
                return
        try:
            nvml.nvmlInit()
            self._handles = [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
            self._nvml = nvml
        except Exception as exc:  # no driver, no device: an agent without GPUs
            log.debug("agent [metrics] NVML unavailable: %s", exc)
            self._handles = []

    def sample(self) -> list[GpuUsage]:
        out = []
        for index, handle in self._handles:
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                out.append(GpuUsage(index, float(util.gpu) / 100.0, int(mem.used), int(mem.total)))
            except Exception as exc:  # a GPU fell off the bus: report the others
                log.warning("agent [metrics] NVML query of GPU %d failed: %s", index, exc)
        return out

    def close(self) -> None:
        if self._handles:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._handles = []


# --------------------------------------------------------------------------- snapshot and collector


@dataclass(frozen=True)
class ReplicaRow:
    replica_id: str
    deployment: str
    state: str
    restarts: int
    cpu_seconds: float
    cpu_percent: float
    rss_bytes: int
    processes: int


@dataclass(frozen=True)
class Snapshot:
    replicas: tuple[ReplicaRow, ...] = ()
    gpus: tuple[GpuUsage, ...] = ()
    registered: bool = False


class AgentCollector(Collector):
    def __init__(self, owner: "AgentMetrics") -> None:
        self._owner = owner

    def collect(self) -> Iterator[Any]:
        snap = self._owner.snapshot
        counts = dict.fromkeys(STATES, 0)
        for r in snap.replicas:
            counts[r.state] = counts.get(r.state, 0) + 1
        by_state = GaugeMetricFamily(PREFIX + "replicas", "Replicas of this agent by state", labels=["state"])
        for name, n in counts.items():
            by_state.add_metric([name], n)
        yield by_state
        labels = ["replica", "deployment"]
        state = GaugeMetricFamily(PREFIX + "replica_state", "1 for the replica's current state",
                                  labels=labels + ["state"])
        restarts = CounterMetricFamily(PREFIX + "replica_restarts", "Restarts of the replica by this agent",
                                       labels=labels)
        cpu = CounterMetricFamily(PREFIX + "replica_cpu_seconds", "CPU seconds of the replica's process tree",
                                  labels=labels)
        rss = GaugeMetricFamily(PREFIX + "replica_resident_memory_bytes",
                                "Resident memory of the replica's process tree (shared pages count per process)",
                                labels=labels)
        procs = GaugeMetricFamily(PREFIX + "replica_processes", "Processes in the replica's tree", labels=labels)
        for r in snap.replicas:
            key = [r.replica_id, r.deployment]
            for s in STATES:
                state.add_metric(key + [s], 1 if s == r.state else 0)
            restarts.add_metric(key, r.restarts)
            cpu.add_metric(key, r.cpu_seconds)
            rss.add_metric(key, r.rss_bytes)
            procs.add_metric(key, r.processes)
        yield from (state, restarts, cpu, rss, procs)
        util = GaugeMetricFamily(PREFIX + "gpu_utilization_ratio", "GPU busy share over NVML's sample period",
                                 labels=["gpu"])
        used = GaugeMetricFamily(PREFIX + "gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily(PREFIX + "gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        for g in snap.gpus:
            util.add_metric([str(g.index)], g.utilization)
            used.add_metric([str(g.index)], g.memory_used_bytes)
            total.add_metric([str(g.index)], g.memory_total_bytes)
        yield from (util, used, total)
        yield GaugeMetricFamily(PREFIX + "head_connected", "1 while the head has this agent registered",
                                value=1 if snap.registered else 0)


# --------------------------------------------------------------------------- the agent's metrics


class AgentMetrics:
    """Metrics of one Agent. `start(host)` opens /metrics; `address` is then its HOST:PORT."""

    def __init__(self, port: int = 0, nvml: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.port = port
        self.clock = clock
        self.snapshot = Snapshot()
        self.address = ""
        self.registry = metrics_http.registry_with_defaults()
        self.registry.register(AgentCollector(self))
        self.auth_refused = Counter(PREFIX + "auth_refused", "Connections to the agent's replica socket refused "
                                    "by CURVE authentication", ["role", "reason"], registry=self.registry)
        self._gpus = GpuSampler(nvml)
        self._self = TreeSampler(children=False)  # the agent alone: its replicas are sampled apart
        self._trees: dict[str, TreeSampler] = {}
        self._hellos: dict[str, tuple[int, int]] = {}  # replica id -> (pid, metrics port)
        self._host = ""
        self._next_sample = 0.0
        self._server: Optional[metrics_http.MetricsServer] = None

    def start(self, host: str) -> None:
        self._host = host
        self._server = metrics_http.serve(self.registry, host, self.port)
        if self._server is not None:
            self.address = "%s:%d" % (host, self._server.port)
            log.info("[startup] metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        self._gpus.close()
        if self._server is not None:
            self._server.close()
            self._server = None

    def hello(self, msg: ReplicaHello) -> None:
        self._hellos[msg.replica_id] = (msg.pid, msg.metrics_port)

    def report(self, rep: ReplicaReport) -> ReplicaReport:
        """`rep` plus its metrics endpoint (if this process said one) and its last CPU/RSS sample."""
        pid, port = self._hellos.get(rep.replica_id, (0, 0))
        tree = self._trees.get(rep.replica_id)
        endpoint = "%s:%d" % (self._host, port) if port and rep.pid and pid == rep.pid and self._host else ""
        if not endpoint and tree is None:
            return rep
        return msgspec.structs.replace(
            rep, metrics_endpoint=endpoint, cpu_percent=tree.cpu_percent if tree and rep.pid else 0.0,
            rss_bytes=tree.rss_bytes if tree and rep.pid else 0)

    def usage(self) -> AgentUsage:
        live = [t for t in self._trees.values() if t.pid]
        return AgentUsage(cpu_percent=self._self.cpu_percent + sum(t.cpu_percent for t in live),
                          rss_bytes=self._self.rss_bytes + sum(t.rss_bytes for t in live),
                          gpus=list(self.snapshot.gpus))

    def update(self, now: float, records: dict[str, Any], registered: bool) -> None:
        """Sample at most once per SAMPLE_INTERVAL; `records` are agent.lifecycle.ReplicaRecord by id."""
        if now < self._next_sample:
            return
        self._next_sample = now + SAMPLE_INTERVAL
        try:
            self._sample(now, records, registered)
        except Exception:
            log.exception("agent [metrics] sample failed; going on")

    def _sample(self, now: float, records: dict[str, Any], registered: bool) -> None:
        self._self.sample(os.getpid(), now)
        for gone in set(self._trees) - set(records):
            del self._trees[gone]
        for gone in set(self._hellos) - set(records):
            del self._hellos[gone]
        rows = []
        for replica_id, rec in records.items():
            tree = self._trees.setdefault(replica_id, TreeSampler())
            tree.sample(rec.pid, now)
            rows.append(ReplicaRow(replica_id, rec.spec.deployment, rec.state.value, rec.restarts,
                                   tree.cpu_seconds, tree.cpu_percent, tree.rss_bytes,
                                   len(tree.procs) if rec.pid else 0))
        self.snapshot = Snapshot(tuple(rows), tuple(self._gpus.sample()), registered)
