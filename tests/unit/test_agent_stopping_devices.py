"""A stopping replica keeps its GPUs and cores until its process is gone: the head unassigns it (and may
place its successor here) while it still drains, and a vLLM started on a GPU another process still fills
fails to load ("Free memory on device ... less than desired GPU memory utilization"), which counted
against the new replica. The agent's reactor is driven by hand with fake processes: no sockets."""
from __future__ import annotations

import pytest

from agent import server
from agent.config import AgentConfig
from agent.devices import DeviceAllocator
from agent.repin import REPIN_DELAY
from agent.server import Agent
from runtime.capacity import Host
from runtime.protocol import ReplicaSpec, ReplicaState, ReplicaStatus


class FakeProcess:
    """Stands for agent.processes.ReplicaProcess: records its environment, exits when told."""

    def __init__(self, spec, host, endpoint, env=None, **kwargs) -> None:
        self.pid = 100 + len(started)
        self.spec, self.env = spec, dict(env or {})
        self.stopping = False
        self.gone = False
        started.append(self)

    def poll(self):
        return None

    def begin_stop(self, grace, now):
        self.stopping = True

    def poll_stop(self, now):
        return self.gone

    def kill_now(self):
        pass


started: list[FakeProcess] = []


@pytest.fixture
def agent(monkeypatch):
    monkeypatch.delenv("TOKENRELAY_CURVE_DIR", raising=False)
    monkeypatch.setattr(server, "ReplicaProcess", FakeProcess)
    started.clear()
    a = Agent(AgentConfig(metrics_port=-1, stop_grace=5.0), clock=lambda: 0.0)
    a.replica_endpoint = "tcp://127.0.0.1:1"
    return a


def _on(agent: Agent, gpus: int, cores: int) -> Agent:
    agent.devices = DeviceAllocator(range(gpus), range(cores))
    agent.host = Host(cpus=cores, memory_bytes=64 << 30, gpus=gpus)
    return agent


def _spec(rid: str, gpus: int = 0) -> ReplicaSpec:
    return ReplicaSpec(rid, "chat", "vllm", "m", gpus=gpus, drain_seconds=10.0)


def _ready(agent: Agent, rid: str, now: float) -> None:
    agent.records[rid].status(ReplicaStatus(rid, True, 0, 0, 0.0, 1, 0, 0, 0, 0), now)


def _report(agent: Agent, rid: str):
    return next(r for r in agent._reports() if r.replica_id == rid)


def test_a_replacement_waits_for_the_gpu_until_the_old_process_is_gone(agent):
    _on(agent, gpus=1, cores=8)
    agent._apply([_spec("chat-old", gpus=1)])
    agent._supervise(0.0)
    old = started[-1]
    assert old.env["CUDA_VISIBLE_DEVICES"] == "0"
    _ready(agent, "chat-old", 1.0)
    agent._apply([_spec("chat-new", gpus=1)])  # a rolling update on a full GPU host
    assert old.stopping
    for now in (2.0, 10.0, 20.0):  # draining, then the stop grace
        agent._supervise(now)
        assert started == [old]
    report = _report(agent, "chat-new")
    assert report.state == ReplicaState.BACKOFF and "chat-old" in report.message
    old.gone = True
    agent._supervise(21.0)  # reaps the stop: the GPU is free
    agent._supervise(21.05)
    assert started[-1].spec.replica_id == "chat-new" and started[-1].env["CUDA_VISIBLE_DEVICES"] == "0"
    assert _report(agent, "chat-new").message == ""


def test_a_replacement_takes_a_free_gpu_at_once_not_the_one_still_in_use(agent):
    _on(agent, gpus=2, cores=8)
    agent._apply([_spec("chat-old", gpus=1)])
    agent._supervise(0.0)
    agent._apply([_spec("chat-new", gpus=1)])
    agent._supervise(1.0)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in started] == ["0", "1"]  # the free one, at once


def test_a_replica_reassigned_while_its_process_stops_waits_for_that_process(agent):
    _on(agent, gpus=1, cores=8)
    agent._apply([_spec("chat-a", gpus=1)])
    agent._supervise(0.0)
    agent._apply([])
    agent._apply([_spec("chat-a", gpus=1)])  # scaled down and up again under the same id
    agent._supervise(1.0)
    assert len(started) == 1
    started[0].gone = True
    agent._supervise(2.0)
    agent._supervise(2.05)
    assert len(started) == 2 and started[1].env["CUDA_VISIBLE_DEVICES"] == "0"


def test_pinned_cores_stay_taken_until_the_old_process_is_gone(agent):
    _on(agent, gpus=0, cores=2)
    agent._apply([_spec("chat-a"), _spec("chat-b")])
    agent._supervise(0.0)
    assert [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in started] == ["0", "1"]
    b = started[1]
    agent._apply([_spec("chat-a"), _spec("chat-c")])  # b is replaced: c gets its core
    agent._supervise(1.0)
    assert len(started) == 2 and "chat-b" in _report(agent, "chat-c").message
    b.gone = True
    agent._supervise(2.0)
    agent._supervise(2.05)
    assert started[-1].spec.replica_id == "chat-c" and started[-1].env["VLLM_CPU_OMP_THREADS_BIND"] == "1"


def test_a_re_pinned_replica_keeps_its_cores_until_it_stops_then_restarts_on_its_share(agent):
    _on(agent, gpus=0, cores=2)
    agent._apply([_spec("chat-a")])
    agent._supervise(0.0)
    a = started[0]
    _ready(agent, "chat-a", 1.0)
    agent._apply([_spec("chat-a"), _spec("chat-b")])
    agent._supervise(2.0)  # b gets core 1 at once (sharing it with a until a restarts)
    assert started[1].env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    _ready(agent, "chat-b", 3.0)
    agent._supervise(3.0)  # a leaves routing ...
    agent._supervise(3.0 + REPIN_DELAY)  # ... and is stopped
    assert a.stopping and agent.devices.get("chat-a").cpus == (0, 1)  # its process still runs there
    a.gone = True
    agent._supervise(10.0)
    assert agent.devices.get("chat-a") is None
    agent._supervise(10.05)
    assert started[-1].spec.replica_id == "chat-a" and started[-1].env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert agent.records["chat-a"].restarts == 0 and agent._repins.wanted == set()


class FakeAdopted(FakeProcess):
    """Stands for agent.processes.AdoptedProcess: a replica a previous agent started with `env`."""

    def environ(self) -> dict:
        return dict(self.env)


def _adopt(agent: Agent, monkeypatch, rid: str, env: dict) -> FakeAdopted:
    from runtime.protocol import PROTOCOL_VERSION, ReplicaHello

    proc = FakeAdopted(_spec(rid), None, None, env)
    monkeypatch.setattr(server.AdoptedProcess, "verified", classmethod(lambda cls, pid, replica_id: proc))
    agent._adopt(ReplicaHello(PROTOCOL_VERSION, rid, "tcp://x:1", proc.pid, 0, "chat", 1), 0.0)
    started.clear()
    return proc


def test_an_adopted_replica_keeps_its_gpu_running_and_while_it_stops(agent, monkeypatch):
    """After an agent restart (`tokenrelay up` adopts its replicas) the devices a replica holds are read
    from its environment: a new replica gets the other GPU, and a successor waits for the stopping one."""
    _on(agent, gpus=2, cores=8)
    old = _adopt(agent, monkeypatch, "chat-a", {"CUDA_VISIBLE_DEVICES": "1"})
    agent._apply([_spec("chat-a", gpus=1), _spec("chat-b", gpus=1)])
    agent._supervise(0.0)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in started] == ["0"]  # not chat-a's GPU 1
    agent._apply([_spec("chat-b", gpus=1), _spec("chat-c", gpus=1)])  # chat-a retired: it stops
    assert old.stopping
    agent._supervise(1.0)
    assert len(started) == 1 and "waiting for stopping replica(s) chat-a" in agent.records["chat-c"].message
    old.gone = True
    agent._supervise(2.0)  # reaps chat-a's stop
    agent._supervise(2.0 + 60)  # past any wait
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in started] == ["0", "1"]


def test_an_adopted_cpu_replica_keeps_its_cores(agent, monkeypatch):
    _on(agent, gpus=0, cores=4)
    _adopt(agent, monkeypatch, "chat-a", {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "CUDA_VISIBLE_DEVICES": ""})
    assert agent.devices.get("chat-a").cpus == (0, 1) and agent.devices.free_cores == [2, 3]


def test_an_unreadable_environment_adopts_no_devices() -> None:
    devices = DeviceAllocator(range(2), range(4))
    assert devices.adopt("r", {"CUDA_VISIBLE_DEVICES": "GPU-uuid-1"}).gpus == ()
    assert devices.adopt("r", {}).gpus == () and devices.free_gpus == [0, 1]
