"""Failed replicas heal: unassigned, replaced after a doubling backoff, elsewhere when another host fits."""
from __future__ import annotations

from head.cluster import ClusterState
from head.healing import Healer
from runtime.protocol import (
    PROTOCOL_VERSION, AgentHeartbeat, AgentRegister, Capacity, ReplicaReport, ReplicaStatus,
)
from runtime.stack_config import DeploymentSpec


def _register(state, agent_id, now=0.0):
    state.register_agent(AgentRegister(PROTOCOL_VERSION, agent_id, agent_id, Capacity(4, 16 << 30)), now)


def _report(state, agent_id, now, state_name, message=""):
    reports = [ReplicaReport(s.replica_id, s.deployment, state_name, "tcp://h:1", 1, generation=s.generation,
                             message=message,
                             status=ReplicaStatus(s.replica_id, state_name == "ready", 0, 0, 0.0, 1, 0, 0, 0, 0))
               for s in state.assignment_for(agent_id)]
    state.heartbeat(AgentHeartbeat(agent_id, 1, reports), now)


def test_backoff_doubles_up_to_the_maximum_and_starts_over_after_a_ready_replica():
    h = Healer(base=2.0, maximum=5.0)
    assert h.failed("d", "r1", "a1", "boom", 10.0) == 2.0
    assert h.waiting("d", 11.0).startswith("retrying in 1s (failure 1: replica r1 on a1: boom)")
    assert h.waiting("d", 12.0) is None
    assert h.failed("d", "r2", "a2", "boom", 12.5) == 4.0
    assert h.failed("d", "r3", "a1", "boom", 17.0) == 5.0
    assert h.avoid("d") == {"a1", "a2"}
    h.ready("d", placed_at=16.0)  # placed before the last failure: proves nothing
    assert h.failures["d"].count == 3
    h.ready("d", placed_at=22.0)
    assert h.waiting("d", 22.1) is None and h.avoid("d") == set() and h.describe("d", 23.0) == ""


def test_a_failed_replica_is_replaced_after_backoff_on_another_agent_and_status_says_why_and_when():
    state = ClusterState([DeploymentSpec("d", "mock", "m", replicas=1)])
    _register(state, "a1")
    state.reconcile(0.0)
    (first,) = state.assignment_for("a1")
    _register(state, "a2", 0.5)  # a second host joins after the first placement
    _report(state, "a1", 1.0, "failed", "engine cannot start (exit 3, 2 times); not restarting")
    state.reconcile(1.0)
    assert state.assignment_for("a1") == [] and state.assignment_for("a2") == []
    deployments, _ = state.status(1.5, 0.0)
    d = deployments[0]
    assert d.state == "pending" and d.pending_reason.startswith("retrying in 2s (failure 1: replica %s on a1"
                                                                       % first.replica_id)
    assert "engine cannot start" in d.failures and "next try in 2s" in d.failures
    state.reconcile(2.9)
    assert state.assignment_for("a2") == []
    state.reconcile(3.0)
    assert len(state.assignment_for("a2")) == 1 and state.assignment_for("a1") == []  # not where it failed
    # it fails there too: the next try waits twice as long, then goes where it fits best again
    _report(state, "a2", 4.0, "failed", "5 crashes within 60s; not restarting")
    state.reconcile(4.0)
    assert "retrying in 4s (failure 2" in state.pending_reason["d"]
    state.reconcile(8.0)
    placed = state.assignment_for("a1") + state.assignment_for("a2")
    assert len(placed) == 1
    owner = "a1" if state.assignment_for("a1") else "a2"
    _report(state, owner, 9.0, "ready")
    state.reconcile(9.0)
    assert state.status(9.0, 0.0)[0][0].failures == "" and state.status(9.0, 0.0)[0][0].state == "healthy"


def test_a_spec_change_starts_the_count_over():
    spec = DeploymentSpec("d", "mock", "m", replicas=1)
    state = ClusterState([spec])
    _register(state, "a1")
    state.reconcile(0.0)
    _report(state, "a1", 1.0, "failed", "boom")
    state.reconcile(1.0)
    assert "d" in state.pending_reason
    state.put_deployment(DeploymentSpec("d", "mock", "m", replicas=1, engine_args={"fixed": True}))
    state.reconcile(1.1)
    assert len(state.assignment_for("a1")) == 1 and "d" not in state.pending_reason


def test_an_old_generation_replica_failing_during_an_update_does_not_delay_the_new_one():
    spec = DeploymentSpec("d", "mock", "m", replicas=1)
    state = ClusterState([spec])
    _register(state, "a1")
    state.reconcile(0.0)
    state.put_deployment(DeploymentSpec("d", "mock", "m", replicas=1, engine_args={"v": 2}))
    old = [s for s in state.assignment_for("a1") if s.generation == 1]
    state.heartbeat(AgentHeartbeat("a1", 1, [ReplicaReport(old[0].replica_id, "d", "failed", generation=1,
                                                           message="boom")]), 1.0)
    state.reconcile(1.0)
    assert "d" not in state.healer.failures and [s.generation for s in state.assignment_for("a1")] == [2]
