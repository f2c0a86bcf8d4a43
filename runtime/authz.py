"""Who may do what: role x socket and role x head message -> allowed, or the reason for refusal.

Pure logic, no sockets, no files: runs in the head (per control message), and in the ZAP handlers of the
head, the agent and replicas (per connection). Peers are `runtime.keyring.Peer` (role, name) as the key
registry says; a peer the registry does not know never gets here (its connection is refused by ZAP).

    socket (ZAP domain)        accepts
    control (head ROUTER)      agent, proxy, operator keys; then per message, below
    publish (head PUB)         proxy, operator
    replica (replica data)     proxy
    agent-replicas (agent)     the agent's own key only (its replicas connect with it)

    head message                          from
    AgentRegister, AgentHeartbeat,        agent, and only for agent_id == the key's name
    AgentLeaving
    HeadHello, SnapshotRequest            proxy, operator
    ScaleDemand                           proxy (requests wait for a scaled-to-zero deployment)
    StatusRequest                         operator, proxy (status carries no secrets a proxy lacks)
    DeployRequest, ScaleRequest,          operator (plus the admin token, checked by the head)
      DeleteRequest
Refusal reasons (the `reason` label of tokenrelay_*_auth_refused_total): unknown_key, revoked, role,
agent_id, replica_not_owned.
"""
from __future__ import annotations

from typing import Optional

from runtime.keyring import Peer

CONTROL = "control"
PUBLISH = "publish"
REPLICA_DATA = "replica"
AGENT_REPLICAS = "agent-replicas"

REASONS = ("unknown_key", "revoked", "role", "agent_id", "replica_not_owned")

_DOMAIN_ROLES: dict[str, tuple[str, ...]] = {
    CONTROL: ("agent", "proxy", "operator"),
    PUBLISH: ("proxy", "operator"),
    REPLICA_DATA: ("proxy",),
    AGENT_REPLICAS: ("agent",),
}

_MESSAGE_ROLES: dict[str, tuple[str, ...]] = {
    "AgentRegister": ("agent",),
    "AgentHeartbeat": ("agent",),
    "AgentLeaving": ("agent",),
    "HeadHello": ("proxy", "operator"),
    "SnapshotRequest": ("proxy", "operator"),
    "ScaleDemand": ("proxy",),
    "StatusRequest": ("operator", "proxy"),
    "DeployRequest": ("operator",),
    "ScaleRequest": ("operator",),
    "DeleteRequest": ("operator",),
}


def connect_refusal(domain: str, peer: Optional[Peer], lookup_reason: str,
                    own_agent: Optional[str] = None) -> Optional[str]:
    """None if `peer` may connect to a socket of `domain`, else the reason. `lookup_reason` is the
    registry's ("" for a registered key); `own_agent`: for AGENT_REPLICAS, the agent's own name."""
    if peer is None or lookup_reason:
        return lookup_reason or "unknown_key"
    if peer.role not in _DOMAIN_ROLES.get(domain, ()):
        return "role"
    if domain == AGENT_REPLICAS and peer.name != own_agent:
        return "agent_id"
    return None


def message_refusal(peer: Peer, message_type: str, agent_id: Optional[str] = None) -> Optional[str]:
    """None if `peer` may send this head message, else the reason. `agent_id`: the message's, for agent
    messages. A type missing from the table is refused to every role (fail closed: a message type the
    head learns to handle later is nobody's until it is listed here)."""
    roles = _MESSAGE_ROLES.get(message_type, ())
    if peer.role not in roles:
        return "role"
    if peer.role == "agent" and agent_id != peer.name:
        return "agent_id"
    return None


def owned_reports(agent_id: str, replica_ids: list[str], owners: dict[str, str]) -> tuple[list[str], list[str]]:
    """Split an agent's replica reports into (its own or unclaimed, another agent's). A replica belongs
    to the first agent that reported it (the head persists that binding)."""
    mine: list[str] = []
    foreign: list[str] = []
    for rid in replica_ids:
        (foreign if owners.get(rid, agent_id) != agent_id else mine).append(rid)
    return mine, foreign
