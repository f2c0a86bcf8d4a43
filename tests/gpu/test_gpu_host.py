"""GPU tier: NVML discovery, placement by GPU count and device assignment, on a real NVIDIA host.

Skipped wherever NVML finds no GPU (CI and this project's CPU machines). On a GPU host, with the
project's core dependencies installed (vLLM is not needed): `python -m pytest tests/gpu -v`.

What a user would notice if these broke: an agent that reports no GPUs (nothing with `gpus:` is ever
placed), a replica that sees a different GPU than the one it was given (two replicas share a card, one
runs out of memory), or GPU dashboards that stay flat while a model runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import yaml

from runtime import keyring

from agent.devices import DeviceAllocator, discover_gpus, host_cpu_cores
from agent.metrics import GpuSampler
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
GPUS = discover_gpus()
pytestmark = pytest.mark.skipif(not GPUS, reason="no NVIDIA GPU visible through NVML on this host")

TORCH_PROBE = r"""
import json, torch
out = {"count": torch.cuda.device_count()}
if out["count"]:
    p = torch.cuda.get_device_properties(0)
    out.update(name=p.name, uuid=str(p.uuid), memory=p.total_memory)
print(json.dumps(out))
"""


def _has_torch() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    return probe.returncode == 0


def _probe_torch(env_update: dict[str, str]) -> dict:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(env_update)
    done = subprocess.run([sys.executable, "-c", TORCH_PROBE], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _nvml_uuid(index: int) -> str:
    import pynvml
    pynvml.nvmlInit()
    try:
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
        return uuid.decode() if isinstance(uuid, bytes) else uuid
    finally:
        pynvml.nvmlShutdown()


def test_discovery_matches_nvidia_smi() -> None:
    query = ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
    smi = subprocess.run(query, capture_output=True, text=True, timeout=60)
    assert smi.returncode == 0, smi.stderr
    rows = [[c.strip() for c in line.split(",")] for line in smi.stdout.strip().splitlines()]
    print("NVML:", [(g.index, g.name, g.memory_bytes) for g in GPUS])
    print("nvidia-smi:", rows)
    assert [g.index for g in GPUS] == [int(r[0]) for r in rows]
    assert [g.name for g in GPUS] == [r[1] for r in rows]
    for gpu, row in zip(GPUS, rows, strict=True):  # nvidia-smi prints whole MiB
        assert gpu.memory_bytes // 2**20 == int(row[2])


def test_each_replica_sees_exactly_the_gpu_it_was_given() -> None:
    if not _has_torch():
        pytest.skip("torch is not installed here: cannot look through CUDA's eyes")
    allocator = DeviceAllocator([g.index for g in GPUS], host_cpu_cores())
    given = [allocator.allocate("gpu-replica-%d" % i, gpus=1) for i in range(len(GPUS))]
    assert sorted(a.gpus[0] for a in given) == [g.index for g in GPUS]  # no GPU handed out twice
    with pytest.raises(ValueError, match="free"):
        allocator.allocate("one-too-many", gpus=1)
    for alloc in given:
        seen = _probe_torch(alloc.env)
        print("replica env", alloc.env, "-> torch sees", seen)
        assert seen["count"] == 1
        nvml_uuid = _nvml_uuid(alloc.gpus[0])
        assert nvml_uuid.removeprefix("GPU-") == seen["uuid"].removeprefix("GPU-")
        assert seen["name"] == GPUS[alloc.gpus[0]].name
    # a CPU replica on a GPU host gets no GPU at all
    cpu_alloc = DeviceAllocator([g.index for g in GPUS], host_cpu_cores()).allocate("cpu-replica", cpus=1)
    assert _probe_torch(cpu_alloc.env)["count"] == 0


LOAD = r"""
import sys, time, torch
hold = torch.empty(int(sys.argv[1]), dtype=torch.uint8, device="cuda")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
print("ready", flush=True)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
"""


def test_agent_gpu_metrics_follow_a_real_workload() -> None:
    if not _has_torch():
        pytest.skip("torch is not installed here: cannot put load on the GPU")
    sampler = GpuSampler()
    before = {g.index: g for g in sampler.sample()}
    assert set(before) == {g.index for g in GPUS}
    hold = 8 * 2**30
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(GPUS[0].index), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    load = subprocess.Popen([sys.executable, "-c", LOAD, str(hold), "30"], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert load.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20
        best = None
        while time.monotonic() < deadline:
            now = {g.index: g for g in sampler.sample()}[GPUS[0].index]
            best = now if best is None or now.utilization > best.utilization else best
            loaded = now.memory_used_bytes >= before[GPUS[0].index].memory_used_bytes + hold
            if loaded and best.utilization > 0.5:
                break
            time.sleep(0.2)
        print("before", before[GPUS[0].index], "under load", now, "peak utilization", best.utilization)
        assert now.memory_used_bytes >= before[GPUS[0].index].memory_used_bytes + hold
        assert best.utilization > 0.5
        assert now.memory_total_bytes == GPUS[0].memory_bytes
    finally:
        load.kill()
        load.wait(30)
        sampler.close()


def test_head_places_by_the_gpus_the_agent_discovered(tmp_path: Path) -> None:
    """Real head and agent processes: the agent registers its GPUs; the head places a one-GPU vLLM replica
    there (the agent pins it to a GPU) and leaves a deployment that needs more GPUs than the host has
    pending, with the reason."""
    from runtime.credentials import client_token
    from runtime.head_client import HeadRefused, HeadUnreachable, status

    control = "tcp://127.0.0.1:%d" % free_port()
    too_many = len(GPUS) + 1
    deployments = [
        {"name": "one-gpu", "engine": "vllm", "model": str(tmp_path / "no-model-here"), "gpus": 1},
        {"name": "too-big", "engine": "mock", "model": "mock", "gpus": too_many},
    ]
    config = tmp_path / "deployments.yaml"
    config.write_text(yaml.safe_dump({"deployments": deployments}))
    state = tmp_path / "state"
    metrics_port = free_port()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, TOKENRELAY_STATE_DIR=str(state))
    keyring.ensure_single_host(state / "keys", "gpu-host")  # secure by default: the host's keys
    logs = {name: open(tmp_path / ("%s.log" % name), "wb") for name in ("head", "agent")}
    procs = [
        subprocess.Popen([sys.executable, "-m", "head", "--control", control, "--publish",
                          "tcp://127.0.0.1:%d" % free_port(), "--config", str(config)],
                         cwd=ROOT, env=env, stdout=logs["head"], stderr=subprocess.STDOUT),
        subprocess.Popen([sys.executable, "-m", "agent", "--head", control, "--host", "127.0.0.1",
                          "--agent-id", "gpu-host", "--metrics-port", str(metrics_port)],
                         cwd=ROOT, env=env, stdout=logs["agent"], stderr=subprocess.STDOUT),
    ]
    try:
        deadline = time.monotonic() + 60
        reply = None
        while time.monotonic() < deadline:
            try:
                reply = status(control, client_token(directory=str(state)), keys=state / "keys")
            except (HeadUnreachable, HeadRefused):  # not up yet, or its token file not written yet
                reply = None
            if reply and reply.agents and any(d.pending_reason for d in reply.deployments) \
                    and b"gets gpus=" in (tmp_path / "agent.log").read_bytes():
                break
            time.sleep(0.2)
        assert reply is not None and reply.agents, "the agent never registered"
        agent = reply.agents[0]
        print("agent as the head sees it:", json.dumps(msgspec.to_builtins(agent)))
        assert [(g.index, g.name, g.memory_bytes) for g in agent.gpus] == \
            [(g.index, g.name, g.memory_bytes) for g in GPUS]
        by_name = {d.name: d for d in reply.deployments}
        print("one-gpu:", by_name["one-gpu"].state, by_name["one-gpu"].pending_reason)
        print("too-big:", by_name["too-big"].state, by_name["too-big"].pending_reason)
        assert by_name["too-big"].state == "pending"
        assert "need %d" % too_many in by_name["too-big"].pending_reason
        assert by_name["one-gpu"].pending_reason == ""
        agent_log = (tmp_path / "agent.log").read_text()
        assigned = [line for line in agent_log.splitlines() if "gets gpus=" in line]
        print("agent assignment:", assigned)
        assert assigned and "gets gpus=[%d]" % GPUS[0].index in assigned[0]
        import urllib.request
        total: list[str] = []
        deadline = time.monotonic() + 20
        while not total and time.monotonic() < deadline:  # the agent samples NVML every few seconds
            scrape = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port, timeout=10)
            total = [line for line in scrape.read().decode().splitlines()
                     if line.startswith("tokenrelay_agent_gpu_memory_total_bytes")]
            time.sleep(0.5)
        print("agent metrics:", total)
        assert len(total) == len(GPUS)
        assert float(total[0].rsplit(" ", 1)[1]) == float(GPUS[0].memory_bytes)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in logs.values():
            f.close()
        print("---- agent log tail\n" + (tmp_path / "agent.log").read_text()[-3000:])
