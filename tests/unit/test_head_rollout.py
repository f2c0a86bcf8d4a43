"""head.cluster rolling updates that cannot deadlock: replace one at a time when nothing fits beside."""
from __future__ import annotations

import dataclasses

from head.cluster import ClusterState
from runtime.protocol import (
    PROTOCOL_VERSION, AgentHeartbeat, AgentRegister, Capacity, ReplicaReport, ReplicaStatus,
)
from runtime.stack_config import DeploymentSpec, Rollout


def _register(state, agent_id, cpus=2):
    state.register_agent(AgentRegister(PROTOCOL_VERSION, agent_id, agent_id, Capacity(cpus, 16 << 30)), 0.0)


def _report_all_ready(state, agent_id, now):
    reports = [ReplicaReport(s.replica_id, s.deployment, "ready", "tcp://h:1", 1, generation=s.generation,
                             status=ReplicaStatus(s.replica_id, True, 0, 0, 0.0, 1, 0, 0, 0, 0))
               for s in state.assignment_for(agent_id)]
    state.heartbeat(AgentHeartbeat(agent_id, 1, reports), now)


def _routed(state):
    return {r.replica_id for r in state.routes()[0].replicas}


def _generations(state, agent_id="a1"):
    return sorted(s.generation for s in state.assignment_for(agent_id))


def test_the_issue_case_cpus_0_to_cpus_1_with_two_replicas_on_two_cores_completes():
    old_spec = DeploymentSpec("smollm2", "vllm", "smollm2", replicas=1)
    state = ClusterState([old_spec])
    _register(state, "a1")
    state.reconcile(0.0)
    _report_all_ready(state, "a1", 0.5)
    (old_id,) = _routed(state)
    assert state.put_deployment(dataclasses.replace(old_spec, cpus=1.0, replicas=2))[0] == "updated"
    state.reconcile(1.0)
    assert _generations(state) == [1, 2]  # one new beside the old (1 core each); no room for a second
    assert _routed(state) == {old_id} and "smollm2" not in state.pending_reason
    assert "no room" in state.rollout_note["smollm2"]
    _report_all_ready(state, "a1", 5.0)  # the new one is ready: the old leaves routing to make room
    state.reconcile(5.1)
    assert old_id not in _routed(state) and len(_routed(state)) == 1
    state.reconcile(6.2)  # unassigned after the drain delay, and its slot is taken by the second new one
    assert _generations(state) == [2, 2]
    _report_all_ready(state, "a1", 9.0)
    state.reconcile(9.1)
    assert len(_routed(state)) == 2 and not state.rollout_note and not state.pending_reason


def test_full_host_replaces_one_at_a_time_never_below_max_unavailable():
    spec = DeploymentSpec("d", "mock", "m", replicas=3, cpus=1.0, engine_args={"v": 1})
    state = ClusterState([spec])
    _register(state, "a1", cpus=3)
    state.reconcile(0.0)
    _report_all_ready(state, "a1", 0.5)
    state.put_deployment(dataclasses.replace(spec, engine_args={"v": 2}))
    now, fewest_routed = 1.0, 3
    for _ in range(40):
        state.reconcile(now)
        fewest_routed = min(fewest_routed, len(_routed(state)))
        if _generations(state) == [2, 2, 2] and len(_routed(state)) == 3:
            break
        _report_all_ready(state, "a1", now + 0.3)
        now += 0.6
    else:
        raise AssertionError("the update never finished: %s" % _generations(state))
    assert fewest_routed == 2  # one replica short at a time (max_unavailable 1), never more


def test_max_unavailable_0_waits_for_room_and_says_so():
    spec = DeploymentSpec("d", "mock", "m", replicas=2, cpus=1.0, rollout=Rollout(max_unavailable=0))
    state = ClusterState([spec])
    _register(state, "a1", cpus=2)
    state.reconcile(0.0)
    _report_all_ready(state, "a1", 0.5)
    state.put_deployment(dataclasses.replace(spec, engine_args={"v": 2}))
    for t in (1.0, 2.0, 3.0):
        state.reconcile(t)
    assert _generations(state) == [1, 1] and len(_routed(state)) == 2
    assert "0 of 2 CPU core(s) free" in state.pending_reason["d"]
    _register(state, "a2", cpus=2)  # room appears: the update surges onto it
    state.reconcile(4.0)
    assert len(state.assignment_for("a2")) == 2


def test_max_surge_limits_new_replicas_beside_the_old():
    spec = DeploymentSpec("d", "mock", "m", replicas=4, rollout=Rollout(max_surge=1))
    state = ClusterState([spec])
    _register(state, "a1", cpus=64)
    state.reconcile(0.0)
    _report_all_ready(state, "a1", 0.5)
    state.put_deployment(dataclasses.replace(spec, engine_args={"v": 2}))
    state.reconcile(1.0)
    assert _generations(state).count(2) == 1  # one new replica beside the old ones, not more
