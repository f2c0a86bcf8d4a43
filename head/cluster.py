"""The head's picture of the cluster, and the decisions it makes from it. Pure logic, no sockets.

Runs in the head process; every method takes `now` so tests fake time. Never does I/O (head.access
hooks `on_unassigned` to drop replica bindings from head.db).

Hard state: deployments (what operators asked for). Soft state, rebuilt from agents after a restart:
agents, which replica runs where, their health and load. The head never invents a replica's health:
a replica is routable only while its agent is alive and reports it ready.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from dataclasses import dataclass, field
from typing import Callable, Container, Optional

from head import views
from head.views import ROUTABLE_STATE
from head.healing import Healer
from runtime.capacity import Demand, Host, demand_of, why_not
from runtime.protocol import (
    AgentHeartbeat, AgentRegister, AgentStatus, Capacity, DeploymentRoute, DeploymentStatus, ReplicaReport,
    ReplicaSpec,
)
from runtime.stack_config import DeploymentSpec

log = logging.getLogger(__name__)

DRAIN_DELAY = 1.0  # seconds a retired replica stays assigned after leaving routing (table propagation)
ID_BYTES = 3  # random bytes in a replica id (name-<hex>), drawn again while the id is taken


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
    generation: int = 0
    draining_since: Optional[float] = None  # retired: out of routing, stopped after DRAIN_DELAY
    demand: Optional[Demand] = None  # what it takes from its host (its generation's spec); None: current


def demand(dep: DeploymentSpec) -> Demand:
    return demand_of(dep.engine, dep.gpus, dep.cpus, dep.memory_bytes)


def host_of(cap: Capacity) -> Host:
    return Host(cap.cpus, cap.memory_bytes, len(cap.gpus))


class ClusterState:
    def __init__(self, deployments: list[DeploymentSpec], agent_timeout: float = 3.0,
                 generations: Optional[dict[str, int]] = None) -> None:
        self.deployments: dict[str, DeploymentSpec] = {d.name: d for d in deployments}
        self.generations: dict[str, int] = {d.name: (generations or {}).get(d.name, 1) for d in deployments}
        self.agent_timeout = agent_timeout
        self.agents: dict[str, AgentRecord] = {}
        self.placements: dict[str, Placement] = {}
        self.pending_reason: dict[str, str] = {}
        self.rollout_note: dict[str, str] = {}  # a rolling update replacing in place, or why it waits
        self.healer = Healer()
        # each deployment's /v1/models entry, from its replicas (ReplicaStatus.model_card): kept while none
        # runs (scaled to zero, restarting), dropped by a new generation (another model) and by a delete
        self.model_cards: dict[str, bytes] = {}
        # head.access (with CURVE keys) keeps replica -> agent bindings: a new replica id is drawn again
        # while it names a binding too, and bindings go when their placement ends for good
        self.bound_ids: Container[str] = frozenset()
        self.on_unassigned: Callable[[list[str]], None] = lambda replica_ids: None

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
                    rep.replica_id, rep.deployment, agent_id, now, rep.generation)
                log.info("[startup] adopted replica %s of %s on agent %s", rep.replica_id,
                         rep.deployment, agent_id)
            if placement is not None and placement.agent_id == agent_id:
                agent.reports[rep.replica_id] = rep

    def expire_agents(self, now: float) -> list[str]:
        """Forget agents silent for longer than the timeout; their replicas leave routing."""
        dead = [a.agent_id for a in self.agents.values() if now - a.last_seen > self.agent_timeout]
        for agent_id in dead:
            lost = self._forget_agent(agent_id)
            log.warning("[failover] agent %s silent for %.1fs: dropped %d replica(s) %s", agent_id,
                        self.agent_timeout, len(lost), lost)
        return dead

    def agent_left(self, agent_id: str, reason: str) -> bool:
        """An agent said it is shutting down (AgentLeaving): forget it and its replicas now, as planned.
        False if it was not registered."""
        if agent_id not in self.agents:
            return False
        lost = self._forget_agent(agent_id)
        self.on_unassigned(lost)  # it stops them all (an agent that leaves its replicas running never says so)
        log.info("[shutdown] agent %s is leaving (%s): %d replica(s) leave routing %s", agent_id,
                 reason or "no reason given", len(lost), lost)
        return True

    def _forget_agent(self, agent_id: str) -> list[str]:
        del self.agents[agent_id]
        lost = [p.replica_id for p in self.placements.values() if p.agent_id == agent_id]
        for replica_id in lost:
            del self.placements[replica_id]
        return lost

    # ------------------------------------------------------------------ desired state

    def put_deployment(self, spec: DeploymentSpec) -> tuple[str, int]:
        """Create or update. Returns (what happened, generation): "created", "unchanged", "scaled" (only
        the replica count changed), "configured" (routing, timeouts or admission limit: the routing
        table changes, replicas stay) or "updated" (a new generation: a rolling update)."""
        old = self.deployments.get(spec.name)
        if old is None:
            self.deployments[spec.name] = spec
            self.generations[spec.name] = 1
            return "created", 1
        self.deployments[spec.name] = spec
        if old == spec:
            return "unchanged", self.generations[spec.name]
        if old.same_replicas_as(spec):
            changed = "scaled" if dataclasses.replace(old, replicas=spec.replicas) == spec else "configured"
            return changed, self.generations[spec.name]
        self.generations[spec.name] += 1
        self.healer.reset(spec.name)
        self.model_cards.pop(spec.name, None)
        return "updated", self.generations[spec.name]

    def delete_deployment(self, name: str) -> bool:
        self.healer.reset(name)
        self.model_cards.pop(name, None)
        return self.deployments.pop(name, None) is not None and self.generations.pop(name, None) is not None

    # ------------------------------------------------------------------ placement

    def reconcile(self, now: float) -> None:
        """Make placements converge on the deployments; idempotent, one pass.

        Rolling update: replicas of the current generation are placed first (surge); an old replica is
        retired only when a new one is READY. Retired (and scaled-down, and deleted) replicas leave
        routing at once and are unassigned DRAIN_DELAY later; their process then drains in-flight
        requests for the deployment's drain_seconds before it exits.
        """
        self.pending_reason = {}
        self.rollout_note = {}
        ended = []  # unassigned for good: their agents stop them
        for replica_id, p in list(self.placements.items()):
            if p.draining_since is None and p.deployment not in self.deployments:
                p.draining_since = now
            if p.draining_since is not None and now - p.draining_since >= DRAIN_DELAY:
                del self.placements[replica_id]
                ended.append(replica_id)
            elif p.draining_since is None and self._heal(p, now):
                ended.append(replica_id)
        for dep in self.deployments.values():
            self._reconcile_one(dep, self.generations[dep.name], now)
        if ended:
            self.on_unassigned(ended)

    def _reconcile_one(self, dep: DeploymentSpec, gen: int, now: float) -> None:
        live = [p for p in self.placements.values() if p.deployment == dep.name and p.draining_since is None]
        new = [p for p in live if p.generation == gen]
        old = [p for p in live if p.generation != gen]
        # too many of the current generation (scale down): retire those not ready first, then newest
        surplus = sorted(new, key=lambda p: (self._is_ready(p), -p.placed_at))[:max(0, len(new) - dep.replicas)]
        for p in surplus:
            p.draining_since = now
        new = [p for p in new if p.draining_since is None]
        blocked = ""
        surge = dep.rollout.max_surge
        waiting = self.healer.waiting(dep.name, now) if len(new) < dep.replicas else None
        if waiting:
            self.pending_reason[dep.name] = waiting
        for _ in range(0 if waiting else dep.replicas - len(new)):
            if old and surge is not None and len(new) + len(old) >= dep.replicas + surge:
                blocked = "max_surge %d reached" % surge
                break
            agent_id, reason = self._choose_agent(dep, avoid=self.healer.avoid(dep.name))
            if agent_id is None:
                blocked = reason
                break
            replica_id = self._new_replica_id(dep.name)
            placement = Placement(replica_id, dep.name, agent_id, now, gen, demand=demand(dep))
            self.placements[replica_id] = placement
            new.append(placement)
            log.info("placed replica %s of %s (generation %d) on agent %s", replica_id, dep.name, gen, agent_id)
        ready_new = sum(1 for p in new if self._is_ready(p))
        keep_old = max(0, dep.replicas - ready_new)
        for p in sorted(old, key=lambda p: (self._is_ready(p), p.placed_at))[:max(0, len(old) - keep_old)]:
            p.draining_since = now
            log.info("retiring replica %s of %s (generation %d)", p.replica_id, dep.name, p.generation)
        old = [p for p in old if p.draining_since is None]
        if blocked and old:
            self._replace_in_place(dep, old, ready_new, blocked, now)
        elif blocked:
            self.pending_reason[dep.name] = blocked

    def _new_replica_id(self, deployment: str) -> str:
        """name-<random hex>, unlike every placement and every bound id (an id bound to another agent
        would have this replica's reports refused as replica_not_owned)."""
        while True:
            replica_id = "%s-%s" % (deployment, secrets.token_hex(ID_BYTES))
            if replica_id not in self.placements and replica_id not in self.bound_ids:
                return replica_id

    def _heal(self, p: Placement, now: float) -> bool:
        """A replica its agent gave up on is unassigned (the agent drops it) and replaced after a backoff
        (head.healing), elsewhere if another agent fits; a ready one ends the backoff. True: unassigned."""
        rep = self.report(p)
        if rep is None:
            return False
        if rep.state == ROUTABLE_STATE:
            self.healer.ready(p.deployment, p.placed_at)
        elif rep.state == "failed":
            del self.placements[p.replica_id]
            if p.generation != self.generations.get(p.deployment):
                log.info("replica %s of %s (old generation %d) failed; not replaced", p.replica_id,
                         p.deployment, p.generation)
                return True  # an update is replacing it anyway; its failure says nothing of the new spec
            delay = self.healer.failed(p.deployment, p.replica_id, p.agent_id, rep.message, now)
            log.warning("[failover] replica %s of %s failed on %s (%s); placing a replacement in %.0fs",
                        p.replica_id, p.deployment, p.agent_id, rep.message, delay)
            return True
        return False

    def _replace_in_place(self, dep: DeploymentSpec, old: list[Placement], ready_new: int, blocked: str,
                          now: float) -> None:
        """A rolling update with no room for a new replica beside the old ones: retire one old replica
        (not-ready ones first) when that keeps the ready count within max_unavailable of `replicas`
        and no earlier retirement still holds its slot; its capacity then takes a new one."""
        draining = any(p.deployment == dep.name and p.draining_since is not None for p in self.placements.values())
        victim = sorted(old, key=lambda p: (self._is_ready(p), p.placed_at))[0]
        available = ready_new + sum(1 for p in old if self._is_ready(p))
        short = dep.replicas - available + (1 if self._is_ready(victim) else 0)
        if draining:
            self.rollout_note[dep.name] = "replacing one at a time (no room beside the old replicas)"
        elif short <= dep.rollout.max_unavailable:
            victim.draining_since = now
            self.rollout_note[dep.name] = "replacing one at a time (no room beside the old replicas)"
            log.info("[update] %s: no room for a new replica (%s); retiring %s to replace it",
                     dep.name, blocked, victim.replica_id)
        else:
            self.rollout_note[dep.name] = "waiting: no room beside the old replicas (%s) and max_unavailable %d " \
                "allows no more" % (blocked, dep.rollout.max_unavailable)
            if dep.rollout.max_unavailable == 0:
                self.pending_reason[dep.name] = blocked

    def load_of(self, name: str) -> tuple[int, int, int]:
        """(requests running or waiting on its ready replicas, ready replicas, starting replicas) of a
        deployment, from its agents' last reports: the autoscaler's input."""
        ongoing = ready = starting = 0
        for p in self.placements.values():
            if p.deployment != name or p.draining_since is not None:
                continue
            rep = self.report(p)
            if rep is not None and rep.state == ROUTABLE_STATE:
                ready += 1
                ongoing += rep.status.running + rep.status.waiting if rep.status else 0
            elif rep is None or rep.state in ("starting", "backoff"):
                starting += 1
        return ongoing, ready, starting

    def ttft_p90_of(self, name: str) -> Optional[float]:
        """The worst TTFT p90 its ready replicas report (each over its last window); None: none reported."""
        worst: Optional[float] = None
        for p in self.placements.values():
            rep = self.report(p) if p.deployment == name and p.draining_since is None else None
            if rep is not None and rep.state == ROUTABLE_STATE and rep.status is not None \
                    and rep.status.ttft_p90_s is not None:
                worst = max(worst or 0.0, rep.status.ttft_p90_s)
        return worst

    def _is_ready(self, p: Placement) -> bool:
        rep = self.report(p)
        return rep is not None and rep.state == ROUTABLE_STATE

    def _placed(self, agent_id: str, skip: str = "") -> list[Demand]:
        """Demands of the replicas assigned to an agent (draining ones too: they hold their devices
        until unassigned), except those of deployment `skip`."""
        out = []
        for p in self.placements.values():
            dep = self.deployments.get(p.deployment)
            if p.agent_id == agent_id and dep is not None and p.deployment != skip:
                out.append(p.demand or demand(dep))
        return out

    def _choose_agent(self, dep: DeploymentSpec, extra: Optional[dict[str, list[Demand]]] = None,
                      skip: str = "", avoid: frozenset[str] | set[str] = frozenset()) -> tuple[Optional[str], str]:
        """Where the next replica fits (runtime.capacity, the agent's own arithmetic); spread: fewest
        replicas of this deployment, then fewest overall. `extra`: demands to count as placed too
        (a dry run); `skip`: a deployment whose placements to leave out; `avoid`: agents where it failed,
        chosen only when no other fits. Returns (agent id, "") or
        (None, why nothing fits)."""
        if not self.agents:
            return None, "no agent registered"
        best: Optional[tuple[bool, int, int, str]] = None
        reasons = []
        want = demand(dep)
        for agent in self.agents.values():
            if any(agent.labels.get(k) != v for k, v in dep.placement_labels.items()):
                reasons.append("%s: labels do not match %s" % (agent.agent_id, dep.placement_labels))
                continue
            placed = self._placed(agent.agent_id, skip) + (extra or {}).get(agent.agent_id, [])
            why = why_not(host_of(agent.capacity), placed, want)
            if why:
                reasons.append("%s: %s" % (agent.agent_id, why))
                continue
            mine = [p for p in self.placements.values() if p.agent_id == agent.agent_id and p.deployment != skip]
            key = (agent.agent_id in avoid, sum(1 for p in mine if p.deployment == dep.name)
                   + len((extra or {}).get(agent.agent_id, [])), len(mine), agent.agent_id)
            if best is None or key < best:
                best = key
        if best is None:
            return None, "no agent fits: " + "; ".join(sorted(reasons))
        return best[3], ""

    def why_unplaceable(self, spec: DeploymentSpec) -> str:
        """Dry run: "" if `spec.replicas` replicas of `spec` fit beside every other deployment's
        replicas (its own current ones are left out: a rolling update can replace them one at a time),
        else why not. Judges only with at least one agent registered."""
        if not self.agents or spec.replicas == 0:
            return ""
        extra: dict[str, list[Demand]] = {}
        for i in range(spec.replicas):
            agent_id, reason = self._choose_agent(spec, extra, skip=spec.name)
            if agent_id is None:
                return "only %d of %d replica(s) of %s fit: %s" % (i, spec.replicas, spec.name,
                                                                  reason.replace("no agent fits: ", ""))
            extra.setdefault(agent_id, []).append(demand(spec))
        return ""

    def assignment_for(self, agent_id: str) -> list[ReplicaSpec]:
        specs = []
        for p in sorted(self.placements.values(), key=lambda p: p.replica_id):
            if p.agent_id != agent_id:
                continue
            dep = self.deployments.get(p.deployment)
            if dep is None:  # deleted; the placement is draining and about to go
                continue
            specs.append(ReplicaSpec(
                p.replica_id, dep.name, dep.engine, dep.model, dict(dep.engine_args), dep.gpus,
                dep.max_ongoing_requests, p.generation, dep.cpus, dep.memory_bytes, dep.drain_seconds))
        return specs

    # ------------------------------------------------------------------ views

    def report(self, p: Placement) -> Optional[ReplicaReport]:
        agent = self.agents.get(p.agent_id)
        return agent.reports.get(p.replica_id) if agent else None

    def routes(self) -> list[DeploymentRoute]:
        """The routing table's content: each deployment with its healthy replicas (head.views)."""
        return views.routes(self)

    def status(self, now: float, wall_now: float) -> tuple[list[DeploymentStatus], list[AgentStatus]]:
        """`tokenrelay status`'s content (head.views)."""
        return views.status(self, now, wall_now)
