"""The head's picture of the cluster, and the decisions it makes from it. Pure logic, no sockets.

Runs in the head process; every method takes `now` so tests fake time. Never does I/O.

Hard state: deployments (what operators asked for). Soft state, rebuilt from agents after a restart:
agents, which replica runs where, their health and load. The head never invents a replica's health:
a replica is routable only while its agent is alive and reports it ready.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from runtime.protocol import (
    AgentHeartbeat, AgentRegister, Capacity, DeploymentRoute, ReplicaReport, ReplicaRoute, ReplicaSpec,
)
from runtime.stack_config import DeploymentSpec

log = logging.getLogger(__name__)

ROUTABLE_STATE = "ready"


@dataclass
class AgentRecord:
    agent_id: str
    host: str
    capacity: Capacity
    labels: dict[str, str]
    registered_at: float
    last_seen: float
    reports: dict[str, ReplicaReport] = field(default_factory=dict)


@dataclass
class Placement:
    replica_id: str
    deployment: str
    agent_id: str
    placed_at: float


class ClusterState:
    def __init__(self, deployments: list[DeploymentSpec], agent_timeout: float = 3.0) -> None:
        self.deployments: dict[str, DeploymentSpec] = {d.name: d for d in deployments}
        self.agent_timeout = agent_timeout
        self.agents: dict[str, AgentRecord] = {}
        self.placements: dict[str, Placement] = {}
        self.pending_reason: dict[str, str] = {}

    # ------------------------------------------------------------------ agents

    def register_agent(self, msg: AgentRegister, now: float) -> None:
        """A (re)registering agent; replicas it already runs are adopted if still wanted."""
        old = self.agents.get(msg.agent_id)
        if old is not None:
            log.info("agent %s re-registered", msg.agent_id)
        self.agents[msg.agent_id] = AgentRecord(msg.agent_id, msg.host, msg.capacity, dict(msg.labels),
                                                now, now)
        self._take_reports(msg.agent_id, msg.replicas, now, adopt=True)

    def heartbeat(self, msg: AgentHeartbeat, now: float) -> bool:
        """Record a heartbeat; False if the agent is unknown (it must register again)."""
        agent = self.agents.get(msg.agent_id)
        if agent is None:
            return False
        agent.last_seen = now
        self._take_reports(msg.agent_id, msg.replicas, now, adopt=False)
        return True

    def _take_reports(self, agent_id: str, reports: list[ReplicaReport], now: float, adopt: bool) -> None:
        agent = self.agents[agent_id]
        agent.reports = {}
        for rep in reports:
            placement = self.placements.get(rep.replica_id)
            if placement is None and adopt and rep.deployment in self.deployments and rep.state != "failed":
                placement = self.placements[rep.replica_id] = Placement(
                    rep.replica_id, rep.deployment, agent_id, now)
                log.info("[startup] adopted replica %s of %s on agent %s", rep.replica_id,
                         rep.deployment, agent_id)
            if placement is not None and placement.agent_id == agent_id:
                agent.reports[rep.replica_id] = rep

    def expire_agents(self, now: float) -> list[str]:
        """Forget agents silent for longer than the timeout; their replicas leave routing."""
        dead = [a.agent_id for a in self.agents.values() if now - a.last_seen > self.agent_timeout]
        for agent_id in dead:
            del self.agents[agent_id]
            lost = [p.replica_id for p in self.placements.values() if p.agent_id == agent_id]
            for replica_id in lost:
                del self.placements[replica_id]
            log.warning("[failover] agent %s silent for %.1fs: dropped %d replica(s) %s", agent_id,
                        self.agent_timeout, len(lost), lost)
        return dead

    # ------------------------------------------------------------------ placement

    def reconcile(self, now: float) -> None:
        """Make placements match deployments: place missing replicas, remove extra ones."""
        self.pending_reason = {}
        for replica_id, p in list(self.placements.items()):
            if p.deployment not in self.deployments:
                del self.placements[replica_id]
        for dep in self.deployments.values():
            mine = [p for p in self.placements.values() if p.deployment == dep.name]
            for p in sorted(mine, key=lambda p: p.placed_at)[dep.replicas:]:
                del self.placements[p.replica_id]
            for _ in range(dep.replicas - len(mine)):
                agent_id = self._choose_agent(dep)
                if agent_id is None:
                    self.pending_reason[dep.name] = (
                        "no agent" if not self.agents else
                        "no agent has %d free GPU(s)" % dep.gpus)
                    break
                replica_id = "%s-%s" % (dep.name, secrets.token_hex(3))
                self.placements[replica_id] = Placement(replica_id, dep.name, agent_id, now)
                log.info("placed replica %s of %s on agent %s", replica_id, dep.name, agent_id)

    def _choose_agent(self, dep: DeploymentSpec) -> Optional[str]:
        """Spread: the agent with the fewest replicas of this deployment, then fewest overall."""
        best: Optional[tuple[int, int, str]] = None
        for agent in self.agents.values():
            mine = [p for p in self.placements.values() if p.agent_id == agent.agent_id]
            used_gpus = sum(self.deployments[p.deployment].gpus for p in mine
                            if p.deployment in self.deployments)
            if dep.gpus and len(agent.capacity.gpus) - used_gpus < dep.gpus:
                continue
            key = (sum(1 for p in mine if p.deployment == dep.name), len(mine), agent.agent_id)
            if best is None or key < best:
                best = key
        return best[2] if best else None

    def assignment_for(self, agent_id: str) -> list[ReplicaSpec]:
        specs = []
        for p in sorted(self.placements.values(), key=lambda p: p.replica_id):
            if p.agent_id != agent_id:
                continue
            dep = self.deployments[p.deployment]
            specs.append(ReplicaSpec(p.replica_id, dep.name, dep.engine, dep.model, dict(dep.engine_args),
                                     dep.gpus, dep.max_ongoing_requests))
        return specs

    # ------------------------------------------------------------------ views

    def _report(self, p: Placement) -> Optional[ReplicaReport]:
        agent = self.agents.get(p.agent_id)
        return agent.reports.get(p.replica_id) if agent else None

    def routes(self) -> list[DeploymentRoute]:
        """The routing table's content: each deployment with its healthy replicas."""
        out = []
        for dep in sorted(self.deployments.values(), key=lambda d: d.name):
            replicas = []
            for p in sorted(self.placements.values(), key=lambda p: p.replica_id):
                rep = self._report(p) if p.deployment == dep.name else None
                if rep is None or rep.state != ROUTABLE_STATE or not rep.endpoint:
                    continue
                st = rep.status
                replicas.append(ReplicaRoute(
                    rep.replica_id, rep.endpoint, st.running if st else 0, st.waiting if st else 0,
                    st.kv_cache_usage if st else 0.0, dep.max_ongoing_requests))
            out.append(DeploymentRoute(dep.name, dep.engine, dep.model, replicas))
        return out

    def status(self, now: float, wall_now: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        deployments = []
        for dep in sorted(self.deployments.values(), key=lambda d: d.name):
            replicas = []
            for p in sorted(self.placements.values(), key=lambda p: p.replica_id):
                if p.deployment != dep.name:
                    continue
                rep = self._report(p)
                agent = self.agents.get(p.agent_id)
                st = rep.status if rep else None
                replicas.append({
                    "replica_id": p.replica_id, "agent": p.agent_id, "host": agent.host if agent else "",
                    "state": rep.state if rep else "assigned", "endpoint": rep.endpoint if rep else "",
                    "pid": rep.pid if rep else 0, "restarts": rep.restarts if rep else 0,
                    "age_s": round(wall_now - rep.started_at, 1) if rep and rep.started_at else 0.0,
                    "message": rep.message if rep else "",
                    "running": st.running if st else 0, "waiting": st.waiting if st else 0,
                    "kv_cache_usage": st.kv_cache_usage if st else 0.0,
                    "tokens_generated": st.tokens_generated if st else 0,
                    "requests_finished": st.requests_finished if st else 0,
                    "requests_aborted": st.requests_aborted if st else 0,
                })
            ready = sum(1 for r in replicas if r["state"] == ROUTABLE_STATE)
            state = "pending" if dep.name in self.pending_reason else (
                "healthy" if ready >= dep.replicas else "degraded")
            deployments.append({**dep.to_dict(), "state": state, "ready_replicas": ready,
                                "pending_reason": self.pending_reason.get(dep.name, ""),
                                "replica_list": replicas})
        agents = [{
            "agent_id": a.agent_id, "host": a.host, "cpus": a.capacity.cpus,
            "memory_bytes": a.capacity.memory_bytes,
            "gpus": [{"index": g.index, "name": g.name, "memory_bytes": g.memory_bytes}
                     for g in a.capacity.gpus],
            "labels": a.labels, "last_heartbeat_s": round(now - a.last_seen, 2),
            "replicas": len(a.reports),
        } for a in sorted(self.agents.values(), key=lambda a: a.agent_id)]
        return deployments, agents
