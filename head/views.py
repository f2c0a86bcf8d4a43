"""What the head shows of its cluster state: the routing table's content and `tokenrelay status`.

Pure functions of a head.cluster.ClusterState (`cluster`), no sockets; run in the head process. `routes` also
records each deployment's model card (a replica's /v1/models entry, ReplicaStatus.model_card) in the
state, since the card outlives the replicas that reported it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.protocol import (
    MODEL_CARD_MAX_BYTES, AgentStatus, DeploymentRoute, DeploymentStatus, ReplicaRoute, ReplicaState,
    ReplicaStatusRow,
)

if TYPE_CHECKING:
    from head.cluster import ClusterState

ROUTABLE_STATE = ReplicaState.READY


def routes(cluster: ClusterState) -> list[DeploymentRoute]:
    """The routing table's content: each deployment with its healthy replicas."""
    out = []
    for dep in sorted(cluster.deployments.values(), key=lambda d: d.name):
        replicas = []
        for p in sorted(cluster.placements.values(), key=lambda p: p.replica_id):
            rep = cluster.report(p) if p.deployment == dep.name and p.draining_since is None else None
            if rep is not None and rep.status is not None and rep.status.model_card \
                    and len(rep.status.model_card) <= MODEL_CARD_MAX_BYTES \
                    and p.generation == cluster.generations.get(dep.name):
                cluster.model_cards[dep.name] = rep.status.model_card
            if rep is None or rep.state != ROUTABLE_STATE or not rep.endpoint:
                continue
            st = rep.status
            replicas.append(ReplicaRoute(
                rep.replica_id, rep.endpoint, st.running if st else 0, st.waiting if st else 0,
                st.kv_cache_usage if st else 0.0, dep.max_ongoing_requests))
        scaling = dep.autoscaling
        cold = scaling.cold_start_timeout_s if scaling is not None and scaling.min_replicas == 0 else 0.0
        out.append(DeploymentRoute(dep.name, dep.engine, dep.model, replicas, dep.routing, dep.timeouts, cold,
                                   cluster.model_cards.get(dep.name, b"")))
    return out


def status(cluster: ClusterState, now: float, wall_now: float
           ) -> tuple[list[DeploymentStatus], list[AgentStatus]]:
    """Every deployment with its placements as the agents report them, and every agent."""
    deployments = []
    for dep in sorted(cluster.deployments.values(), key=lambda d: d.name):
        replicas = []
        for p in sorted(cluster.placements.values(), key=lambda p: p.replica_id):
            if p.deployment != dep.name:
                continue
            rep = cluster.report(p)
            agent = cluster.agents.get(p.agent_id)
            st = rep.status if rep else None
            replicas.append(ReplicaStatusRow(
                replica_id=p.replica_id, agent=p.agent_id, host=agent.host if agent else "",
                state="draining" if p.draining_since is not None else (rep.state if rep else "assigned"),
                generation=p.generation, endpoint=rep.endpoint if rep else "",
                pid=rep.pid if rep else 0, restarts=rep.restarts if rep else 0,
                age_s=round(wall_now - rep.started_at, 1) if rep and rep.started_at else 0.0,
                message=rep.message if rep else "",
                running=st.running if st else 0, waiting=st.waiting if st else 0,
                kv_cache_usage=st.kv_cache_usage if st else 0.0,
                tokens_generated=st.tokens_generated if st else 0,
                requests_finished=st.requests_finished if st else 0,
                requests_aborted=st.requests_aborted if st else 0,
            ))
        ready = sum(1 for r in replicas if r.state == ROUTABLE_STATE
                    and r.generation == cluster.generations[dep.name])
        state = "pending" if dep.name in cluster.pending_reason else (
            "healthy" if ready >= dep.replicas else "degraded")
        deployments.append(DeploymentStatus(
            **dep.to_dict(), state=state, ready_replicas=ready, generation=cluster.generations[dep.name],
            pending_reason=cluster.pending_reason.get(dep.name, ""),
            rollout_note=cluster.rollout_note.get(dep.name, ""),
            failures=cluster.healer.describe(dep.name, now), replica_list=replicas))
    agents = [AgentStatus(
        agent_id=a.agent_id, host=a.host, cpus=a.capacity.cpus, memory_bytes=a.capacity.memory_bytes,
        gpus=list(a.capacity.gpus), labels=a.labels, last_heartbeat_s=round(now - a.last_seen, 2),
        replicas=len(a.reports),
    ) for a in sorted(cluster.agents.values(), key=lambda a: a.agent_id)]
    return deployments, agents
