"""Role x socket and role x head message: who is let in, and the reason when not (runtime.authz)."""
import pytest

from runtime import authz
from runtime.keyring import Peer

pytestmark = pytest.mark.unit

AGENT, PROXY, OPERATOR = Peer("agent", "vm"), Peer("proxy", "p1"), Peer("operator", "ops")


@pytest.mark.parametrize("domain,peer,own,reason", [
    (authz.CONTROL, AGENT, None, None), (authz.CONTROL, PROXY, None, None), (authz.CONTROL, OPERATOR, None, None),
    (authz.PUBLISH, PROXY, None, None), (authz.PUBLISH, OPERATOR, None, None), (authz.PUBLISH, AGENT, None, "role"),
    (authz.REPLICA_DATA, PROXY, None, None), (authz.REPLICA_DATA, OPERATOR, None, "role"),
    (authz.REPLICA_DATA, AGENT, None, "role"),
    (authz.AGENT_REPLICAS, AGENT, "vm", None), (authz.AGENT_REPLICAS, AGENT, "other", "agent_id"),
    (authz.AGENT_REPLICAS, PROXY, "vm", "role"),
])
def test_connect_by_domain_and_role(domain, peer, own, reason):
    assert authz.connect_refusal(domain, peer, "", own) == reason


def test_unknown_and_revoked_keys_are_refused_everywhere():
    for domain in (authz.CONTROL, authz.PUBLISH, authz.REPLICA_DATA, authz.AGENT_REPLICAS):
        assert authz.connect_refusal(domain, None, "unknown_key") == "unknown_key"
        assert authz.connect_refusal(domain, PROXY, "revoked") == "revoked"


@pytest.mark.parametrize("peer,kind,agent_id,reason", [
    (AGENT, "AgentRegister", "vm", None), (AGENT, "AgentHeartbeat", "vm", None),
    (AGENT, "AgentHeartbeat", "other", "agent_id"),  # an agent key speaking for another agent
    (PROXY, "AgentHeartbeat", "vm", "role"), (OPERATOR, "AgentRegister", "vm", "role"),
    # only an agent itself may say it is leaving (no one may take another agent's replicas out of routing)
    (AGENT, "AgentLeaving", "vm", None), (AGENT, "AgentLeaving", "other", "agent_id"),
    (PROXY, "AgentLeaving", "vm", "role"), (OPERATOR, "AgentLeaving", "vm", "role"),
    (PROXY, "SnapshotRequest", None, None), (PROXY, "HeadHello", None, None), (AGENT, "SnapshotRequest", None, "role"),
    (OPERATOR, "StatusRequest", None, None), (AGENT, "StatusRequest", None, "role"),
    (OPERATOR, "DeployRequest", None, None), (PROXY, "DeployRequest", None, "role"),
    (PROXY, "ScaleRequest", None, "role"), (AGENT, "DeleteRequest", None, "role"),
    # requests waiting for a scaled-to-zero deployment: only a proxy may say so
    (PROXY, "ScaleDemand", None, None), (OPERATOR, "ScaleDemand", None, "role"), (AGENT, "ScaleDemand", "vm", "role"),
    # types the table does not list are nobody's, not everybody's
    (OPERATOR, "GenerateRequest", None, "role"), (AGENT, "ReplicaHello", "vm", "role"),
    (PROXY, "SomethingNew", None, "role"),
])
def test_head_messages_by_role(peer, kind, agent_id, reason):
    assert authz.message_refusal(peer, kind, agent_id) == reason


def test_reports_of_another_agents_replicas_are_split_off():
    owners = {"r1": "vm", "r2": "other"}
    assert authz.owned_reports("vm", ["r1", "r2", "r3"], owners) == (["r1", "r3"], ["r2"])
