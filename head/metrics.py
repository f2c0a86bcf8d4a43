"""Every prometheus metric of the head (prefix `tokenrelay_head_`), and the Prometheus service-discovery file.

Runs in the head process. The head's loop calls `HeadMetrics.note(msg)` for each control message,
`observe_reconcile` after every housekeeping pass and `update(head, now)` from housekeeping (throttled
here to once per UPDATE_INTERVAL). `update` builds an immutable `Snapshot` and swaps it in; the exporter
thread (runtime.metrics_http) only renders that snapshot and prometheus values, never the cluster state.
Owns the /metrics listener (through runtime.metrics_http) and the SD file, which it rewrites atomically
(temp file + rename) and only when the target list changed. Never blocks the loop longer than that
small write; never raises out of `update` (a failed write is logged and retried on the next change).

  name                                             type       labels              meaning
  tokenrelay_head_deployments                      gauge                          deployments
  tokenrelay_head_deployment_desired_replicas      gauge      deployment          replicas asked for
  tokenrelay_head_deployment_ready_replicas        gauge      deployment          ready, current generation
  tokenrelay_head_deployment_state                 gauge      deployment, state   1 for the current state
                                                                                  (healthy|degraded|pending)
  tokenrelay_head_replicas                         gauge      deployment, state   placements by state
  tokenrelay_head_agents                           gauge                          agents alive
  tokenrelay_head_routing_table_version            gauge                          last published version
  tokenrelay_head_routing_table_epoch              gauge                          this head's epoch
  tokenrelay_head_recovering                       gauge                          1 in the recovery grace
  tokenrelay_head_discovery_targets                gauge      role                endpoints in the SD file
  tokenrelay_head_reconcile_duration_seconds       histogram                      one housekeeping pass
  tokenrelay_head_auth_refused_total               counter    role, reason        refused connections and
                                                                                  messages (runtime.authz)
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime import metrics_http
from runtime.protocol import AgentHeartbeat, AgentRegister, AgentStatus, AgentUsage, DeploymentStatus, HeadHello

log = logging.getLogger(__name__)

PREFIX = "tokenrelay_head_"
UPDATE_INTERVAL = 1.0  # seconds between snapshots and SD-file checks
MAX_PROXY_ENDPOINTS_PER_KEY = 8  # HTTP addresses listed for Prometheus per announcing key (see HeadMetrics.note)
REPLICA_STATES = ("assigned", "starting", "ready", "unhealthy", "backoff", "stopping", "failed", "draining")
DEPLOYMENT_STATES = ("healthy", "degraded", "pending")
RECONCILE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


# --------------------------------------------------------------------------- service discovery (pure)


@dataclass(frozen=True, order=True)
class Target:
    """One metrics endpoint as Prometheus file_sd lists it."""

    role: str  # head | agent | replica | proxy
    address: str  # HOST:PORT
    host: str
    replica: str = ""
    deployment: str = ""
    agent: str = ""

    def entry(self) -> dict[str, Any]:
        labels = {"role": self.role, "host": self.host}
        for name in ("replica", "deployment", "agent"):
            if getattr(self, name):
                labels[name] = getattr(self, name)
        return {"targets": [self.address], "labels": labels}


def host_of(address: str) -> str:
    """"10.0.0.5:9100" -> "10.0.0.5"; "[::1]:9100" -> "::1"."""
    return address.rpartition(":")[0].strip("[]") or address


def sd_document(targets: list[Target]) -> list[dict[str, Any]]:
    """Prometheus file_sd content: one entry per target, sorted, duplicates (same address) dropped."""
    seen: set[str] = set()
    out = []
    for t in sorted(targets):
        if t.address in seen:
            continue
        seen.add(t.address)
        out.append(t.entry())
    return out


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and rename, so Prometheus never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- snapshot and collector


@dataclass(frozen=True)
class Snapshot:
    deployments: tuple[tuple[str, int, int, str], ...] = ()  # (name, desired, ready, state)
    replicas: tuple[tuple[str, str, int], ...] = ()  # (deployment, state, count)
    agents: int = 0
    table_version: int = 0
    epoch: int = 0
    recovering: bool = False
    targets: tuple[tuple[str, int], ...] = ()  # (role, count)


class HeadCollector(Collector):
    def __init__(self, owner: "HeadMetrics") -> None:
        self._owner = owner

    def collect(self) -> Iterator[Any]:
        snap = self._owner.snapshot  # one reference read: a consistent snapshot
        yield GaugeMetricFamily(PREFIX + "deployments", "Deployments", value=len(snap.deployments))
        desired = GaugeMetricFamily(PREFIX + "deployment_desired_replicas", "Replicas asked for",
                                    labels=["deployment"])
        ready = GaugeMetricFamily(PREFIX + "deployment_ready_replicas",
                                  "Ready replicas of the current generation", labels=["deployment"])
        state = GaugeMetricFamily(PREFIX + "deployment_state", "1 for the deployment's current state",
                                  labels=["deployment", "state"])
        for name, want, have, current in snap.deployments:
            desired.add_metric([name], want)
            ready.add_metric([name], have)
            for s in DEPLOYMENT_STATES:
                state.add_metric([name, s], 1 if s == current else 0)
        yield desired
        yield ready
        yield state
        replicas = GaugeMetricFamily(PREFIX + "replicas", "Placed replicas by state", labels=["deployment", "state"])
        for dep, s, count in snap.replicas:
            replicas.add_metric([dep, s], count)
        yield replicas
        yield GaugeMetricFamily(PREFIX + "agents", "Agents alive (heartbeating)", value=snap.agents)
        yield GaugeMetricFamily(PREFIX + "routing_table_version", "Version of the last routing table",
                                value=snap.table_version)
        yield GaugeMetricFamily(PREFIX + "routing_table_epoch", "This head's epoch", value=snap.epoch)
        yield GaugeMetricFamily(PREFIX + "recovering", "1 while waiting for agents after a start",
                                value=1 if snap.recovering else 0)
        targets = GaugeMetricFamily(PREFIX + "discovery_targets", "Endpoints in the Prometheus SD list",
                                    labels=["role"])
        for role, count in snap.targets:
            targets.add_metric([role], count)
        yield targets


def summarize(deployments: list[DeploymentStatus]) -> tuple[tuple, tuple]:
    """(deployment rows, replica-state rows) for a Snapshot, from ClusterState.status() deployments."""
    rows, counts = [], []
    for d in deployments:
        rows.append((d.name, d.replicas, d.ready_replicas, d.state))
        by_state = dict.fromkeys(REPLICA_STATES, 0)
        for r in d.replica_list:
            by_state[r.state] = by_state.get(r.state, 0) + 1
        counts += [(d.name, s, n) for s, n in by_state.items()]
    return tuple(rows), tuple(counts)


# --------------------------------------------------------------------------- the head's metrics


@dataclass
class HeadMetrics:
    """Metrics, SD file and per-agent usage of one Head. Construct, then `start(bind, advertise)`."""

    port: int = 0
    sd_file: Optional[str] = None
    static_proxies: tuple[str, ...] = ()
    snapshot: Snapshot = Snapshot()
    address: str = ""  # HOST:PORT this head's /metrics is reachable at ("" when off)
    agent_endpoints: dict[str, str] = field(default_factory=dict)  # agent id -> HOST:PORT
    agent_usage: dict[str, AgentUsage] = field(default_factory=dict)
    # HOST:PORT -> who announced it (its key's ZAP User-Id, "" without keys, "static" from the config), in
    # announcement order; each announcer keeps its newest MAX_PROXY_ENDPOINTS_PER_KEY
    proxies: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.registry = metrics_http.registry_with_defaults()
        self.registry.register(HeadCollector(self))
        self.reconcile = Histogram(PREFIX + "reconcile_duration_seconds", "One housekeeping (reconcile) pass",
                                   buckets=RECONCILE_BUCKETS, registry=self.registry)
        self.auth_refused = Counter(PREFIX + "auth_refused", "Connections and messages refused by "
                                    "authentication or authorisation", ["role", "reason"], registry=self.registry)
        for address in self.static_proxies:
            self.proxies[address] = "static"
        self._server: Optional[metrics_http.MetricsServer] = None
        self._next_update = 0.0
        self._written: Optional[bytes] = None

    def start(self, bind_host: str, advertise_host: str) -> None:
        self._server = metrics_http.serve(self.registry, bind_host, self.port)
        if self._server is not None:
            self.address = "%s:%d" % (advertise_host, self._server.port)
            log.info("[startup] metrics on http://%s/metrics%s", self.address,
                     ", service discovery in %s" % self.sd_file if self.sd_file else "")

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # ------------------------------------------------------------------ from the head's loop

    def note(self, msg: object, who: str = "") -> None:
        """A control message from `who` (its key's ZAP User-Id): remember metrics endpoints and usage
        reports. A proxy's HTTP address is listed for Prometheus until its key has announced
        MAX_PROXY_ENDPOINTS_PER_KEY newer ones (a proxy host restarted on another port), so no key can
        grow the list without bound."""
        if isinstance(msg, AgentRegister) and msg.metrics_endpoint:
            self.agent_endpoints[msg.agent_id] = msg.metrics_endpoint
        elif isinstance(msg, AgentHeartbeat) and msg.usage is not None:
            self.agent_usage[msg.agent_id] = msg.usage
        elif isinstance(msg, HeadHello) and msg.role == "proxy" and msg.http_endpoint:
            if self.proxies.get(msg.http_endpoint) == "static":
                return
            if msg.http_endpoint not in self.proxies:
                log.info("proxy %s registered for metrics discovery", msg.http_endpoint)
            self.proxies.pop(msg.http_endpoint, None)  # re-announced: now the announcer's newest
            self.proxies[msg.http_endpoint] = who
            mine = [address for address, by in self.proxies.items() if by == who]
            for address in mine[:-MAX_PROXY_ENDPOINTS_PER_KEY]:
                del self.proxies[address]
                log.info("proxy %s dropped from metrics discovery (its key announced %d newer ones)",
                         address, MAX_PROXY_ENDPOINTS_PER_KEY)

    def observe_reconcile(self, seconds: float) -> None:
        self.reconcile.observe(seconds)

    def update(self, head: Any, now: float, force: bool = False) -> None:
        """Rebuild the snapshot and the SD file (at most once per UPDATE_INTERVAL unless forced)."""
        if not force and now < self._next_update:
            return
        self._next_update = now + UPDATE_INTERVAL
        try:
            deployments, agents = head.state.status(now, time.time())
            rows, counts = summarize(deployments)
            targets = self.targets(head.state)
            by_role: dict[str, int] = {}
            for t in targets:
                by_role[t.role] = by_role.get(t.role, 0) + 1
            self.snapshot = Snapshot(rows, counts, len(agents), head.tables.version, head.tables.epoch,
                                     head.recovering, tuple(sorted(by_role.items())))
            self._write_sd(targets)
        except Exception:
            log.exception("metrics update failed; going on")

    def targets(self, state: Any) -> list[Target]:
        """Every known metrics endpoint: this head, live agents, their replicas, proxies."""
        out = []
        if self.address:
            out.append(Target("head", self.address, host_of(self.address)))
        for agent_id, agent in state.agents.items():
            address = self.agent_endpoints.get(agent_id)
            if address:
                out.append(Target("agent", address, agent.host, agent=agent_id))
            for rep in agent.reports.values():
                if rep.metrics_endpoint and rep.pid:
                    out.append(Target("replica", rep.metrics_endpoint, agent.host, replica=rep.replica_id,
                                      deployment=rep.deployment, agent=agent_id))
        out += [Target("proxy", address, host_of(address)) for address in self.proxies]
        return out

    def _write_sd(self, targets: list[Target]) -> None:
        if not self.sd_file:
            return
        data = (json.dumps(sd_document(targets), indent=2) + "\n").encode()
        if data == self._written:
            return
        try:
            write_atomic(Path(self.sd_file), data)
        except OSError as exc:
            log.error("cannot write the Prometheus SD file %s: %s", self.sd_file, exc)
            return
        self._written = data
        log.info("Prometheus SD file %s: %d target(s)", self.sd_file, len(targets))

    # ------------------------------------------------------------------ `tokenrelay status`

    def enrich_status(self, state: Any, deployments: list[DeploymentStatus],
                      agents: list[AgentStatus]) -> None:
        """Add resource use and metrics endpoints to ClusterState.status() rows, in place."""
        for d in deployments:
            for r in d.replica_list:
                agent = state.agents.get(r.agent)
                rep = agent.reports.get(r.replica_id) if agent is not None else None
                r.cpu_percent = round(rep.cpu_percent, 1) if rep else 0.0
                r.rss_bytes = rep.rss_bytes if rep else 0
                r.metrics_endpoint = rep.metrics_endpoint if rep else ""
        for a in agents:
            usage = self.agent_usage.get(a.agent_id)
            a.cpu_percent = round(usage.cpu_percent, 1) if usage else 0.0
            a.rss_bytes = usage.rss_bytes if usage else 0
            a.gpu_usage = list(usage.gpus) if usage else []
            a.metrics_endpoint = self.agent_endpoints.get(a.agent_id, "")
