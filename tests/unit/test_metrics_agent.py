"""agent.metrics: process-tree sampling, NVML through a fake, reports and the collector. No sockets."""
import os
import time
from types import SimpleNamespace

import psutil
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.lifecycle import ReplicaRecord, ReplicaState, RestartPolicy
from agent.metrics import AgentMetrics, GpuSampler, TreeSampler
from runtime.protocol import PROTOCOL_VERSION, ReplicaHello, ReplicaReport, ReplicaSpec


def samples(registry) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class FakeNvml:
    def __init__(self, fail_init=False):
        self.fail_init = fail_init
        self.shut = False

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return "h%d" % i

    def nvmlDeviceGetUtilizationRates(self, h):
        if h == "h1":
            raise RuntimeError("GPU is lost")
        return SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)

    def nvmlShutdown(self):
        self.shut = True


def record(rid: str, pid: int, state: ReplicaState = ReplicaState.READY, restarts: int = 0) -> ReplicaRecord:
    rec = ReplicaRecord(ReplicaSpec(rid, "chat", "mock", "m"), RestartPolicy())
    rec.state, rec.pid, rec.restarts = state, pid, restarts
    return rec


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_tree_sampler_counts_cpu_monotonically_and_rss():
    me = psutil.Process()
    t = TreeSampler()
    t.sample(os.getpid(), 0.0)
    first = t.cpu_seconds
    assert first > 0 and t.rss_bytes > 10 * 2**20 and len(t.procs) >= 1
    before = sum(me.cpu_times()[:2])  # the kernel's counter, read between the sampler's two reads
    burn(0.05)
    used = sum(me.cpu_times()[:2]) - before
    assert used > 0
    t.sample(os.getpid(), 1.0)
    # the sampler's reads bracket ours, and the counter only grows: it saw at least what we measured
    assert t.cpu_seconds - first >= used - 1e-9
    assert 100.0 * used - 1e-6 <= t.cpu_percent <= 100.0  # over one (fake) second
    t.sample(0, 2.0)  # the replica exited: nothing sampled, the counter keeps its value
    assert t.cpu_seconds - first >= used - 1e-9 and t.rss_bytes == 0 and t.procs == {}


def test_tree_sampler_lists_children_unless_told_not_to():
    child = psutil.Popen(["sleep", "5"])
    try:
        tree, alone = TreeSampler(), TreeSampler(children=False)
        tree.sample(os.getpid(), 0.0)
        alone.sample(os.getpid(), 0.0)
        assert child.pid in {pid for pid, _ in tree.procs}
        assert [pid for pid, _ in alone.procs] == [os.getpid()]
    finally:
        child.kill()
        child.wait()


def test_tree_sampler_skips_a_vanished_process():
    proc = psutil.Popen(["sleep", "5"])
    try:
        t = TreeSampler()
        t.sample(proc.pid, 0.0)
        assert len(t.procs) == 1
        proc.kill()
        proc.wait()
        t.sample(proc.pid, 1.0)
        assert t.procs == {} and t.rss_bytes == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_gpu_sampler_reports_what_nvml_answers_and_skips_a_lost_gpu():
    nvml = FakeNvml()
    g = GpuSampler(nvml)
    (only,) = g.sample()
    assert (only.index, only.utilization, only.memory_used_bytes, only.memory_total_bytes) == \
        (0, 0.37, 3 * 2**30, 80 * 2**30)
    g.close()
    assert nvml.shut
    assert GpuSampler(FakeNvml(fail_init=True)).sample() == []


def test_report_adds_endpoint_only_for_the_process_that_said_hello():
    m = AgentMetrics(port=-1, nvml=FakeNvml(fail_init=True))
    m.start("10.0.0.5")
    assert m.address == ""  # port -1: no endpoint
    m._host = "10.0.0.5"
    rec = record("r1", os.getpid())
    m.update(0.0, {"r1": rec}, registered=True)
    m.hello(ReplicaHello(PROTOCOL_VERSION, "r1", "tcp://10.0.0.5:6000", os.getpid(), metrics_port=9100))
    rep = m.report(rec.report())
    assert rep.metrics_endpoint == "10.0.0.5:9100" and rep.rss_bytes > 0
    stale = m.report(ReplicaReport("r1", "chat", "ready", pid=os.getpid() + 1))  # restarted: new pid
    assert stale.metrics_endpoint == ""
    assert m.report(ReplicaReport("r9", "chat", "ready")) == ReplicaReport("r9", "chat", "ready")


def test_update_is_throttled_and_builds_the_snapshot_the_collector_renders():
    m = AgentMetrics(port=-1, nvml=FakeNvml())
    records = {"r1": record("r1", os.getpid(), restarts=2), "r2": record("r2", 0, ReplicaState.BACKOFF)}
    m.update(10.0, records, registered=True)
    snap = m.snapshot
    m.update(10.5, records, registered=False)  # within SAMPLE_INTERVAL: no new sample
    assert m.snapshot is snap
    s = samples(m.registry)
    key = (("deployment", "chat"), ("replica", "r1"))
    assert s[("tokenrelay_agent_replicas", (("state", "ready"),))] == 1
    assert s[("tokenrelay_agent_replicas", (("state", "backoff"),))] == 1
    assert s[("tokenrelay_agent_replica_state", key + (("state", "ready"),))] == 1
    assert s[("tokenrelay_agent_replica_state", key + (("state", "failed"),))] == 0
    assert s[("tokenrelay_agent_replica_restarts_total", key)] == 2
    assert s[("tokenrelay_agent_replica_cpu_seconds_total", key)] > 0
    assert s[("tokenrelay_agent_replica_resident_memory_bytes", key)] > 0
    assert s[("tokenrelay_agent_replica_processes", key)] >= 1
    assert s[("tokenrelay_agent_replica_processes", (("deployment", "chat"), ("replica", "r2")))] == 0
    assert s[("tokenrelay_agent_gpu_utilization_ratio", (("gpu", "0"),))] == 0.37
    assert s[("tokenrelay_agent_gpu_memory_total_bytes", (("gpu", "0"),))] == 80 * 2**30
    assert s[("tokenrelay_agent_head_connected", ())] == 1
    usage = m.usage()
    assert usage.rss_bytes > 0 and [g.index for g in usage.gpus] == [0]
    m.update(12.0, {}, registered=False)  # r1 and r2 unassigned: they leave the metrics
    s = samples(m.registry)
    assert not any(name == "tokenrelay_agent_replica_state" for name, _ in s)
    assert s[("tokenrelay_agent_head_connected", ())] == 0
