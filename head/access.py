"""Who may send what on the head's control socket, once CURVE is on (a key directory is configured).

Runs in the head process, called from `Head`'s poll loop only; owns no socket (the ZAP thread that vets
each connection is the head's, runtime.zap) and never reads the clock (callers pass `now`).

For each control message, `ControlAccess.check`:
- re-checks the sender's key against the registry (a key revoked since it connected is refused, and the
  agent it named is dropped at once),
- checks the message type against the key's role and an agent message's agent_id against the key's name
  (runtime.authz.message_refusal),
- strips from an agent's register/heartbeat the reports of replicas another agent owns, and binds to this
  agent the replicas the head placed on it (persisted in head.store, so a restarted head keeps them).
A binding lives as long as the agent may still run its replica: it goes (memory and head.db) when the head
unassigns the replica for good (drained after a scale-down, an update or a delete; failed; its agent left,
stopping its replicas: ClusterState.on_unassigned), when its agent registers without it and the head has
not placed it there, and when its agent has not been registered for ABSENT_AGENT_RETENTION. A binding to
an agent that is merely silent (or a head restart) keeps it, so no other agent key can claim the replica
while the head re-learns placements; new replica ids are drawn unlike the bound ones
(ClusterState.bound_ids).
Every refusal goes to the `refused` callback (the head counts and logs it) and is answered by the head
with the ControlReply `check` returns. `newly_revoked` tells the head which keys were revoked since its
last call, so it can end their sessions.
"""
from __future__ import annotations

from typing import Iterable, Optional

import msgspec

from head.cluster import ClusterState
from head.store import StateStore
from runtime import authz
from runtime.keyring import Peer, Registry
from runtime.protocol import AgentHeartbeat, AgentRegister, ControlReply
from runtime.zap import OnRefused, recheck

ABSENT_AGENT_RETENTION = 3600.0  # seconds an unregistered agent keeps its bindings (it may come back)
SWEEP_INTERVAL = 60.0  # seconds between looks for such agents (done as control messages arrive)


class ControlAccess:
    """Per-message authorisation and the replica -> agent bindings of one head."""

    def __init__(self, registry: Registry, state: ClusterState, store: StateStore, refused: OnRefused) -> None:
        self.registry = registry
        self._state = state
        self._store = store
        self._refused = refused
        self._owners: dict[str, str] = store.owners()  # replica id -> the agent bound to it
        self._bound: dict[str, set[str]] = {}  # agent -> the replica ids bound to it
        for replica_id, agent_id in self._owners.items():
            self._bound.setdefault(agent_id, set()).add(replica_id)
        self._absent_since: dict[str, float] = {}  # bound agents not registered, since when (sweeps)
        self._next_sweep = float("-inf")
        self._revoked_seen = registry.revoked()
        state.bound_ids = self._owners
        state.on_unassigned = self.unbind

    def check(self, user: Optional[str], msg: object, now: float) -> tuple[Optional[object], Optional[ControlReply]]:
        """(the message to handle, None) if its sender may send it (agent reports without another agent's
        replicas), else (None, the refusal to answer). `user`: the connection's ZAP User-Id."""
        if now >= self._next_sweep:
            self._sweep(now)
        kind = type(msg).__name__
        sender, reason = recheck(self.registry, user or "")
        if not reason and sender is not None:
            reason = authz.message_refusal(sender, kind, getattr(msg, "agent_id", None)) or ""
        if reason:
            label = sender.label if sender is not None else "an unknown key"
            agent_id = getattr(msg, "agent_id", None)
            self._refused(sender.role if sender is not None else "unknown", reason, "%s %s%s" % (
                label, kind, " for agent %s" % agent_id if agent_id is not None else ""))
            if reason == "revoked" and sender is not None and sender.role == "agent":
                self._drop_agent(sender.name, now)
            return None, ControlReply(False, "forbidden", "key %s may not send %s (%s)" % (label, kind, reason))
        if isinstance(msg, (AgentRegister, AgentHeartbeat)):
            return self._own_reports(msg), None
        return msg, None

    def newly_revoked(self, now: float) -> frozenset[Peer]:
        """The keys revoked since the last call; the agents they named are dropped from the state."""
        revoked = self.registry.revoked()
        new = revoked - self._revoked_seen
        self._revoked_seen = revoked
        for peer in new:
            if peer.role == "agent":
                self._drop_agent(peer.name, now)
        return new

    def unbind(self, replica_ids: Iterable[str]) -> None:
        """Forget these replicas' bindings (memory and head.db): their placements ended for good."""
        gone = [rid for rid in replica_ids if rid in self._owners]
        if not gone:
            return
        self._store.drop_owners(gone)
        for rid in gone:
            agent_id = self._owners.pop(rid)
            mine = self._bound.get(agent_id)
            if mine is not None:
                mine.discard(rid)
                if not mine:
                    del self._bound[agent_id]
                    self._absent_since.pop(agent_id, None)

    def _sweep(self, now: float) -> None:
        """Drop the bindings of agents unregistered for ABSENT_AGENT_RETENTION (a host that was replaced:
        its replicas were replaced long ago)."""
        self._next_sweep = now + SWEEP_INTERVAL
        for agent_id in list(self._bound):
            if agent_id in self._state.agents:
                self._absent_since.pop(agent_id, None)
            elif now - self._absent_since.setdefault(agent_id, now) >= ABSENT_AGENT_RETENTION:
                self.unbind(list(self._bound[agent_id]))

    def _drop_agent(self, agent_id: str, now: float) -> None:
        if agent_id in self._state.agents:
            self._state.agents[agent_id].last_seen = float("-inf")
            self._state.expire_agents(now)

    def _own_reports(self, msg: AgentRegister | AgentHeartbeat) -> AgentRegister | AgentHeartbeat:
        """Drop reports of replicas another agent owns; bind this agent's placements to it (persisted; an
        adopted replica is bound at the agent's next heartbeat)."""
        ids = [r.replica_id for r in msg.replicas]
        if isinstance(msg, AgentRegister):  # it runs what it reports: a binding it no longer runs goes
            reported = set(ids)
            self.unbind([rid for rid in self._bound.get(msg.agent_id, ()) if rid not in reported
                         and getattr(self._state.placements.get(rid), "agent_id", None) != msg.agent_id])
        claims = {}  # bound owners, else the agent the head placed the replica on
        for rid in ids:
            placement = self._state.placements.get(rid)
            owner = self._owners.get(rid) or (placement.agent_id if placement is not None else None)
            if owner is not None:
                claims[rid] = owner
        mine, foreign = authz.owned_reports(msg.agent_id, ids, claims)
        for rid in foreign:
            self._refused("agent", "replica_not_owned", "agent-%s report for replica %s of agent %s"
                          % (msg.agent_id, rid, claims[rid]))
        # bind only what the head placed on this agent (or adopted from it): binding every id reported
        # would let an agent key grow head.db without bound and squat ids later placed on other agents
        new = [(rid, msg.agent_id) for rid in mine if rid not in self._owners
               and getattr(self._state.placements.get(rid), "agent_id", None) == msg.agent_id]
        if new:
            self._store.bind_owners(new)
            self._owners.update(new)
            self._bound.setdefault(msg.agent_id, set()).update(rid for rid, _ in new)
        if not foreign:
            return msg
        keep = set(mine)
        return msgspec.structs.replace(msg, replicas=[r for r in msg.replicas if r.replica_id in keep])
