"""The agent re-divides a CPU host's cores when vLLM replicas come: the newcomer gets its share at once,
the replica that gave it up is restarted on its smaller share only once another replica of its
deployment is ready (no outage). The agent's reactor is driven by hand: no sockets, no processes."""
from __future__ import annotations

import pytest

from agent.config import AgentConfig
from agent.devices import DeviceAllocator
from agent.lifecycle import ReplicaState
from agent.repin import REPIN_DELAY
from agent.server import Agent
from runtime.capacity import Host
from runtime.protocol import ReplicaSpec, ReplicaStatus


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.stop_grace = None
        self.gone = False

    def poll(self):
        return None

    def begin_stop(self, grace, now):
        self.stop_grace = grace

    def poll_stop(self, now):
        return self.gone

    def kill_now(self):
        pass


@pytest.fixture
def agent(monkeypatch):
    monkeypatch.delenv("TOKENRELAY_CURVE_DIR", raising=False)
    a = Agent(AgentConfig(metrics_port=-1, stop_grace=5.0), clock=lambda: 0.0)
    a.devices = DeviceAllocator([], [0, 1])
    a.host = Host(cpus=2, memory_bytes=16 << 30, gpus=0)
    return a


def _spec(rid: str, cpus: float = 0.0) -> ReplicaSpec:
    return ReplicaSpec(rid, "smollm2", "vllm", "smollm2", cpus=cpus, drain_seconds=2.0)


def _launch(agent: Agent, rid: str, now: float) -> str:
    spec, env = agent._devices_for(agent.records[rid].spec)
    agent.procs[rid] = FakeProc(len(agent.procs) + 100)
    agent.records[rid].launched(agent.procs[rid].pid, now)
    return env["VLLM_CPU_OMP_THREADS_BIND"]


def _ready(agent: Agent, rid: str, now: float) -> None:
    agent.records[rid].status(ReplicaStatus(rid, True, 0, 0, 0.0, 1, 0, 0, 0, 0), now)


def test_scale_to_two_on_two_cores_gives_one_core_each_without_an_outage(agent):
    a, b = _spec("smollm2-a"), _spec("smollm2-b")
    agent._apply([a])
    assert _launch(agent, "smollm2-a", 0.0) == "0-1"  # alone: both cores
    _ready(agent, "smollm2-a", 1.0)
    agent._apply([a, b])
    assert _launch(agent, "smollm2-b", 2.0) == "1"  # the newcomer's share at once
    agent._repin(3.0)
    assert agent.records["smollm2-a"].state == ReplicaState.READY  # b not ready yet: a keeps serving
    _ready(agent, "smollm2-b", 20.0)
    agent._repin(20.0)
    rec = agent.records["smollm2-a"]
    assert rec.state == ReplicaState.BACKOFF and "fewer cores" in rec.message  # out of routing first
    proc = agent.procs["smollm2-a"]
    assert proc.stop_grace is None
    agent._repin(20.0 + REPIN_DELAY)
    assert proc.stop_grace == 2.0 + 5.0 and "smollm2-a" not in agent.procs  # drained, then stopped
    assert not rec.should_start(21.5)  # not before its old process is gone
    proc.gone = True
    agent._supervise(22.0)  # reaps the stop: a may start again at once
    assert rec.should_start(22.0) and rec.restarts == 0  # a planned restart is not a crash
    assert _launch(agent, "smollm2-a", 22.1) == "0"  # now on its one core; b keeps core 1
    assert agent.devices.get("smollm2-b").cpus == (1,)


def test_a_replica_is_not_restarted_when_no_other_of_its_deployment_is_ready(agent):
    other = ReplicaSpec("other-x", "other", "vllm", "m")
    agent._apply([_spec("smollm2-a")])
    _launch(agent, "smollm2-a", 0.0)
    _ready(agent, "smollm2-a", 1.0)
    agent._apply([_spec("smollm2-a"), other])
    assert _launch(agent, "other-x", 2.0) == "1"
    _ready(agent, "other-x", 3.0)
    agent._repin(4.0)
    assert agent.records["smollm2-a"].state == ReplicaState.READY  # shares core 1 rather than an outage


def test_the_agent_refuses_what_the_head_would_not_place(agent):
    agent._apply([_spec("smollm2-a", cpus=2.0)])
    assert _launch(agent, "smollm2-a", 0.0) == "0-1"
    agent._apply([_spec("smollm2-a", cpus=2.0), _spec("smollm2-b")])
    with pytest.raises(ValueError, match=r"0 of 2 CPU core\(s\) free, need 1"):
        agent._devices_for(agent.records["smollm2-b"].spec)


def test_the_plan_takes_one_replica_at_a_time_and_forgets_one_that_is_gone():
    from agent.lifecycle import ReplicaRecord
    from agent.repin import RepinPlan
    from agent.lifecycle import RestartPolicy

    records = {rid: ReplicaRecord(_spec(rid), RestartPolicy()) for rid in ("smollm2-a", "smollm2-b", "smollm2-c")}
    for i, rec in enumerate(records.values()):
        rec.launched(100 + i, 0.0)
        rec.status(ReplicaStatus(rec.replica_id, True, 0, 0, 0.0, 1, 0, 0, 0, 0), 1.0)
    plan = RepinPlan()
    plan.want(["smollm2-a", "smollm2-b"])
    running = set(records)
    assert plan.pick(2.0, records, running) == ("smollm2-a", "smollm2-b")
    assert plan.pick(2.0, records, running) is None  # b waits until a's restart is under way no more
    assert plan.due(2.0 + REPIN_DELAY - 0.01, running) == []
    assert plan.due(2.0 + REPIN_DELAY, running) == ["smollm2-a"]
    assert plan.pick(3.0, records, running) == ("smollm2-b", "smollm2-a")
    assert plan.due(10.0, running - {"smollm2-b"}) == []  # b exited meanwhile: nothing to stop
    assert plan.pick(10.0, records, running) is None and not plan.wanted
