"""runtime.capacity: one resource arithmetic for head placement and agent admission/pinning."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from head.cluster import ClusterState
from runtime.capacity import Demand, Host, core_shares, demand_of, divide_cores, why_not
from runtime.protocol import PROTOCOL_VERSION, AgentRegister, Capacity, GpuInfo
from runtime.stack_config import DeploymentSpec


def test_cpus_zero_vllm_replicas_share_the_cores_at_least_one_each():
    host = Host(cpus=2, memory_bytes=8 << 30, gpus=0)
    share = demand_of("vllm", 0, 0.0, 0)
    assert share.pinned and share.shares and share.cores == 1
    assert why_not(host, [], share) == ""
    assert why_not(host, [share], share) == ""
    reason = why_not(host, [share, share], share)
    assert "0 of 2 CPU core(s) free, need 1" in reason and "at least one core" in reason
    assert core_shares(2, {"a": share}) == {"a": 2}
    assert core_shares(2, {"a": share, "b": share}) == {"a": 1, "b": 1}
    assert core_shares(5, {"a": share, "b": share}) == {"a": 3, "b": 2}


def test_mock_and_gpu_replicas_reserve_cpus_as_a_number_and_are_not_pinned():
    host = Host(cpus=2, memory_bytes=8 << 30, gpus=1)
    assert demand_of("mock", 0, 0.0, 0) == Demand()
    half = demand_of("mock", 0, 0.5, 0)
    assert not half.pinned and half.cores == 0.5
    gpu = demand_of("vllm", 1, 0.0, 0)
    assert not gpu.pinned and gpu.cores == 0
    assert why_not(host, [half, half, half], half) == ""
    assert "0 of 2 CPU core(s) free, need 0.5" in why_not(host, [half] * 4, half)
    assert "0 of 1 GPU(s) free, need 1" in why_not(host, [gpu], gpu)
    # an unpinned reservation takes whole cores away from pinned replicas
    assert core_shares(2, {"m": half, "v": demand_of("vllm", 0, 0.0, 0)}) == {"v": 1}


def test_fixed_cores_and_memory():
    host = Host(cpus=4, memory_bytes=16 << 30, gpus=0)
    two = demand_of("vllm", 0, 1.5, 10 << 30)  # 1.5 cores pinned: two whole cores
    assert two.cores == 2
    assert why_not(host, [], two) == ""
    assert "GiB free, need 10.0 GiB" in why_not(host, [two], two)
    assert core_shares(4, {"f": two, "s": demand_of("vllm", 0, 0.0, 0)}) == {"f": 2, "s": 2}
    with pytest.raises(ValueError, match="lower the deployments' cpus or replicas"):
        core_shares(2, {"f": two, "s": demand_of("vllm", 0, 0.0, 0)})


def test_divide_cores_is_sticky_so_an_arrival_moves_as_few_replicas_as_possible():
    share = demand_of("vllm", 0, 0.0, 0)
    one = divide_cores([0, 1], {"a": share})
    assert one == {"a": (0, 1)}
    two = divide_cores([0, 1], {"a": share, "b": share}, held=one)
    assert two == {"a": (0,), "b": (1,)}  # a keeps core 0 (a subset of what it held): b takes core 1
    # b leaves: a may take both again at its next start
    assert divide_cores([0, 1], {"a": share}, held={"a": (0,)}) == {"a": (0, 1)}
    # a third on four cores: the two keep their lowest cores, the newcomer gets the rest, contiguous
    four = divide_cores([0, 1, 2, 3], {"a": share, "b": share, "c": share}, held={"a": (0, 1), "b": (2, 3)})
    assert four["a"] == (0, 1) and four["b"] == (2,) and four["c"] == (3,)


def _register(state, agent_id, cpus, gpus=0, memory=16 << 30):
    cap = Capacity(cpus, memory, [GpuInfo(i, "A10G", 24 << 30) for i in range(gpus)])
    state.register_agent(AgentRegister(PROTOCOL_VERSION, agent_id, agent_id, cap), 0.0)


def test_scale_the_default_stack_to_two_on_two_cores_and_refuse_a_third():
    spec = DeploymentSpec("smollm2", "vllm", "smollm2", replicas=1)
    state = ClusterState([spec])
    _register(state, "a1", cpus=2)
    state.reconcile(0.0)
    two = dataclasses.replace(spec, replicas=2)
    assert state.why_unplaceable(two) == ""
    state.put_deployment(two)
    state.reconcile(1.0)
    assert len(state.assignment_for("a1")) == 2 and not state.pending_reason
    three = dataclasses.replace(spec, replicas=3)
    reason = state.why_unplaceable(three)
    assert reason.startswith("only 2 of 3 replica(s) of smollm2 fit") and "0 of 2 CPU core(s) free" in reason
    # a new generation is judged without the old replicas (they can be replaced one at a time)
    assert state.why_unplaceable(dataclasses.replace(spec, replicas=2, cpus=1.0, engine_args={"v": 2})) == ""


SPECS = [
    dict(engine="vllm"), dict(engine="vllm", cpus=1.0), dict(engine="vllm", cpus=2.0),
    dict(engine="vllm", gpus=1), dict(engine="vllm", gpus=2, cpus=1.0), dict(engine="mock"),
    dict(engine="mock", cpus=0.5), dict(engine="vllm", memory_bytes=6 << 30),
]


@pytest.mark.parametrize("combo", list(itertools.combinations(range(len(SPECS)), 3)))
def test_the_agent_accepts_and_can_pin_everything_the_head_places(combo):
    """Head/agent agreement: whatever ClusterState assigns, the agent's own check (why_not against the
    other assigned replicas, then divide_cores) accepts, with disjoint cores for pinned replicas."""
    deps = [DeploymentSpec("d%d" % i, model="m", replicas=3, **SPECS[i]) for i in combo]
    state = ClusterState(deps)
    _register(state, "small", cpus=2, gpus=1, memory=8 << 30)
    _register(state, "big", cpus=4, gpus=2, memory=16 << 30)
    for t in range(4):  # placements converge over a few passes
        state.reconcile(float(t))
    placed = 0
    for agent_id, host in (("small", Host(2, 8 << 30, 1)), ("big", Host(4, 16 << 30, 2))):
        specs = state.assignment_for(agent_id)
        placed += len(specs)
        demands = {s.replica_id: demand_of(s.engine, s.gpus, s.cpus, s.memory_bytes) for s in specs}
        for rid, d in demands.items():
            assert why_not(host, [o for r, o in demands.items() if r != rid], d) == "", (agent_id, rid)
        pins = divide_cores(list(range(host.cpus)), demands)
        cores = [c for cs in pins.values() for c in cs]
        assert len(cores) == len(set(cores)) and all(pins.values())
    # it also placed as much as fits: nothing pending could have gone somewhere
    for dep in deps:
        if dep.name in state.pending_reason:
            assert "no agent fits" in state.pending_reason[dep.name]
    assert placed > 0
