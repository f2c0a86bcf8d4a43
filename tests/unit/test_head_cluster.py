import logging

from head.cluster import ClusterState
from head.table import TableVersions
from runtime.protocol import (
    AgentHeartbeat, AgentRegister, Capacity, GpuInfo, ReplicaReport, ReplicaStatus, PROTOCOL_VERSION,
)
from runtime.stack_config import DeploymentSpec


def _register(state, agent_id, now, gpus=0, replicas=()):
    cap = Capacity(8, 1 << 34, [GpuInfo(i, "A10G", 24 << 30) for i in range(gpus)])
    state.register_agent(AgentRegister(PROTOCOL_VERSION, agent_id, agent_id, cap, {}, list(replicas)), now)


def _ready(replica_id, deployment, endpoint="tcp://h:1", running=0):
    st = ReplicaStatus(replica_id, True, running, 0, 0.0, 1, 0, 0, 0, 0)
    return ReplicaReport(replica_id, deployment, "ready", endpoint, 10, status=st, generation=1)


def test_replicas_are_spread_across_agents():
    state = ClusterState([DeploymentSpec("d", "mock", "m", replicas=4)])
    _register(state, "a1", 0.0)
    _register(state, "a2", 0.0)
    state.reconcile(0.0)
    per_agent = [len(state.assignment_for(a)) for a in ("a1", "a2")]
    assert per_agent == [2, 2]


def test_only_ready_replicas_of_live_agents_are_routed():
    state = ClusterState([DeploymentSpec("d", "mock", "m", replicas=2)], agent_timeout=3.0)
    _register(state, "a1", 0.0)
    state.reconcile(0.0)
    r1, r2 = [s.replica_id for s in state.assignment_for("a1")]
    starting = ReplicaReport(r2, "d", "starting", "tcp://h:2", 11)
    state.heartbeat(AgentHeartbeat("a1", 1, [_ready(r1, "d"), starting]), 1.0)
    (route,) = state.routes()
    assert [r.replica_id for r in route.replicas] == [r1]
    # the agent goes silent: its replicas leave routing
    assert state.expire_agents(3.5) == []
    assert state.expire_agents(4.1) == ["a1"]
    assert state.routes()[0].replicas == []


def test_a_leaving_agent_takes_its_replicas_out_of_routing_at_once_without_a_warning(caplog):
    state = ClusterState([DeploymentSpec("d", "mock", "m", replicas=2)], agent_timeout=3.0)
    _register(state, "a1", 0.0)
    _register(state, "a2", 0.0)
    state.reconcile(0.0)
    reports = {a: [_ready(s.replica_id, "d") for s in state.assignment_for(a)] for a in ("a1", "a2")}
    for agent_id, mine in reports.items():
        state.heartbeat(AgentHeartbeat(agent_id, 1, mine), 0.5)
    assert len(state.routes()[0].replicas) == 2
    caplog.set_level("INFO", logger="head.cluster")
    assert state.agent_left("a1", "shutting down") is True
    assert "a1" not in state.agents
    assert [r.replica_id for r in state.routes()[0].replicas] == [r.replica_id for r in reports["a2"]]
    assert state.agent_left("a1", "again") is False  # not registered any more
    assert state.expire_agents(1.0) == []  # nothing left to time out
    assert [r.levelname for r in caplog.records if r.name == "head.cluster" and r.levelno >= logging.WARNING] == []
    assert [r.levelname for r in caplog.records if "leaving (shutting down)" in r.getMessage()] == ["INFO"]
    # its replica is placed again on the agent that is left
    state.reconcile(1.0)
    assert len(state.assignment_for("a2")) == 2


def test_unknown_agent_heartbeat_asks_for_registration():
    state = ClusterState([])
    assert state.heartbeat(AgentHeartbeat("ghost", 1, []), 0.0) is False


def test_restarted_head_adopts_running_replicas_instead_of_placing_new_ones():
    state = ClusterState([DeploymentSpec("d", "mock", "m", replicas=2)])
    running = [_ready("d-aaaaaa", "d"), _ready("d-bbbbbb", "d")]
    _register(state, "a1", 0.0, replicas=running)
    state.reconcile(0.0)
    assert sorted(s.replica_id for s in state.assignment_for("a1")) == ["d-aaaaaa", "d-bbbbbb"]
    assert len(state.routes()[0].replicas) == 2


def test_scale_down_removes_extra_and_gpu_shortage_is_pending():
    state = ClusterState([DeploymentSpec("d", "mock", "m", replicas=3)])
    _register(state, "a1", 0.0, replicas=[_ready("d-%d" % i, "d") for i in range(5)])
    state.reconcile(1.0)
    assert len(state.routes()[0].replicas) == 3  # the extra two leave routing at once ...
    assert len(state.assignment_for("a1")) == 5
    state.reconcile(2.5)
    assert len(state.assignment_for("a1")) == 3  # ... and are unassigned after the drain delay
    state = ClusterState([DeploymentSpec("g", "vllm", "m", replicas=2, gpus=1)])
    _register(state, "a1", 0.0, gpus=1)
    state.reconcile(0.0)
    assert len(state.assignment_for("a1")) == 1
    deployments, _ = state.status(0.0, 0.0)
    assert deployments[0].state == "pending"
    assert "0 of 1 GPU(s) free, need 1" in deployments[0].pending_reason


def test_table_versions_bump_on_change_and_republish_every_interval():
    tv = TableVersions(epoch=7, republish_interval=1.0)
    routes = ClusterState([DeploymentSpec("d", "mock", "m")]).routes()
    t1 = tv.update(routes, 0.0)
    assert (t1.epoch, t1.version) == (7, 1)
    assert tv.update(routes, 0.5) is None
    t2 = tv.update(routes, 1.0)
    assert t2.version == 1  # same content, republished
    t3 = tv.update([], 1.1)
    assert t3.version == 2


def _make_ready(state, agent_id, now):
    reports = [_ready(s.replica_id, s.deployment) for s in state.assignment_for(agent_id)]
    reports = [ReplicaReport(r.replica_id, r.deployment, r.state, r.endpoint, r.pid, status=r.status,
                             generation=s.generation) for r, s in zip(
                                 reports, state.assignment_for(agent_id), strict=True)]
    state.heartbeat(AgentHeartbeat(agent_id, 1, reports), now)


def test_rolling_update_keeps_old_replicas_until_new_are_ready():
    spec = DeploymentSpec("d", "mock", "m", replicas=2, engine_args={"v": 1})
    state = ClusterState([spec])
    _register(state, "a1", 0.0)
    state.reconcile(0.0)
    _make_ready(state, "a1", 0.1)
    old_ids = {r.replica_id for r in state.routes()[0].replicas}
    assert len(old_ids) == 2
    assert state.put_deployment(spec) == ("unchanged", 1)
    assert state.put_deployment(DeploymentSpec("d", "mock", "m", replicas=2, engine_args={"v": 2})) == ("updated", 2)
    state.reconcile(1.0)
    # surge: two new replicas assigned, old ones still routed
    assert len(state.assignment_for("a1")) == 4
    assert {r.replica_id for r in state.routes()[0].replicas} == old_ids
    _make_ready(state, "a1", 1.5)
    state.reconcile(1.6)
    routed = {r.replica_id for r in state.routes()[0].replicas}
    assert routed and routed.isdisjoint(old_ids)
    state.reconcile(3.0)
    assert {s.replica_id for s in state.assignment_for("a1")} == routed
    assert all(s.generation == 2 for s in state.assignment_for("a1"))


def test_labels_and_memory_constrain_placement():
    state = ClusterState([DeploymentSpec("d", "mock", "m", replicas=2, placement_labels={"zone": "b"},
                                         memory_bytes=10 << 30)])
    cap = Capacity(8, 16 << 30, [])
    state.register_agent(AgentRegister(PROTOCOL_VERSION, "a", "a", cap, {"zone": "a"}), 0.0)
    state.register_agent(AgentRegister(PROTOCOL_VERSION, "b", "b", cap, {"zone": "b"}), 0.0)
    state.reconcile(0.0)
    assert len(state.assignment_for("a")) == 0 and len(state.assignment_for("b")) == 1
    reason = state.status(0.0, 0.0)[0][0].pending_reason
    assert "labels do not match" in reason and "GiB free" in reason


def test_dead_agent_replicas_are_replaced_elsewhere():
    state = ClusterState([DeploymentSpec("d", "mock", "m", replicas=2)], agent_timeout=3.0)
    _register(state, "a1", 0.0)
    _register(state, "a2", 0.0)
    state.reconcile(0.0)
    state.heartbeat(AgentHeartbeat("a2", 1, []), 3.0)
    state.expire_agents(3.5)
    state.reconcile(3.5)
    assert len(state.assignment_for("a2")) == 2


def test_routing_and_limits_changes_need_no_rolling_restart():
    spec = DeploymentSpec("d", "mock", "m", replicas=1)
    state = ClusterState([spec])
    import dataclasses
    assert state.put_deployment(dataclasses.replace(spec, replicas=3)) == ("scaled", 1)
    assert state.put_deployment(dataclasses.replace(spec, replicas=3, max_ongoing_requests=7)) == ("configured", 1)
    assert state.put_deployment(dataclasses.replace(spec, replicas=3, max_ongoing_requests=7,
                                                    model="other")) == ("updated", 2)


def test_a_scale_to_zero_deployment_tells_proxies_its_cold_start_timeout():
    from runtime.stack_config import AutoscalingConfig
    zero = DeploymentSpec("z", "mock", "m", replicas=0,
                          autoscaling=AutoscalingConfig(min_replicas=0, cold_start_timeout_s=45.0))
    floor = DeploymentSpec("f", "mock", "m", autoscaling=AutoscalingConfig(min_replicas=1))
    routes = {r.name: r for r in ClusterState([zero, floor, DeploymentSpec("d", "mock", "m")]).routes()}
    assert routes["z"].cold_start_timeout_s == 45.0
    assert routes["f"].cold_start_timeout_s == 0.0 and routes["d"].cold_start_timeout_s == 0.0


def test_each_deployment_carries_its_replicas_model_card_until_a_new_generation_or_a_delete():
    state = ClusterState([DeploymentSpec("d", "vllm", "m", replicas=1)])
    _register(state, "a1", 0.0)
    state.reconcile(0.0)
    (spec,) = state.assignment_for("a1")
    assert state.routes()[0].model_card == b""  # no replica has reported one yet
    st = ReplicaStatus(spec.replica_id, True, 0, 0, 0.0, 1, 0, 0, 0, 0, model_card=b'{"id":"d"}')
    report = ReplicaReport(spec.replica_id, "d", "ready", "tcp://h:1", 10, status=st, generation=1)
    state.heartbeat(AgentHeartbeat("a1", 1, [report]), 1.0)
    assert state.routes()[0].model_card == b'{"id":"d"}'
    huge = ReplicaStatus(spec.replica_id, True, 0, 0, 0.0, 1, 0, 0, 0, 0, model_card=b"x" * 20000)
    state.heartbeat(AgentHeartbeat("a1", 2, [ReplicaReport(spec.replica_id, "d", "ready", "tcp://h:1", 10,
                                                           status=huge, generation=1)]), 2.0)
    assert state.routes()[0].model_card == b'{"id":"d"}'  # too big to ride every table: ignored
    state.expire_agents(10.0)  # its replica is gone: the card stays (a request may start a new one)
    assert state.routes()[0].replicas == [] and state.routes()[0].model_card == b'{"id":"d"}'
    state.put_deployment(DeploymentSpec("d", "vllm", "another-model", replicas=1))
    assert state.routes()[0].model_card == b""  # another model: the old card would be wrong
    _register(state, "a2", 11.0)
    state.heartbeat(AgentHeartbeat("a2", 1, [report]), 11.0)  # a replica of generation 1 reports late
    assert state.routes()[0].model_card == b""
    state.delete_deployment("d")
    assert "d" not in state.model_cards


def test_a_new_replica_id_is_drawn_again_while_it_names_a_placement():
    from unittest import mock

    state = ClusterState([DeploymentSpec("d", "mock", "m", replicas=2)])
    _register(state, "a1", 0.0)
    with mock.patch("head.cluster.secrets.token_hex", side_effect=["aaaaaa", "aaaaaa", "bbbbbb"]):
        state.reconcile(0.0)
    assert sorted(state.placements) == ["d-aaaaaa", "d-bbbbbb"]
