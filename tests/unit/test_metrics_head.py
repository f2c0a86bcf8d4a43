"""head.metrics: the service-discovery list, the snapshot collector, status enrichment. No sockets."""
import json
from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from head.cluster import ClusterState
from head.metrics import HeadMetrics, Target, host_of, sd_document, summarize, write_atomic
from runtime.protocol import (
    PROTOCOL_VERSION, AgentHeartbeat, AgentRegister, AgentUsage, Capacity, DeploymentStatus, GpuUsage, HeadHello,
    ReplicaReport, ReplicaStatus, ReplicaStatusRow,
)
from runtime.stack_config import DeploymentSpec


def samples(registry) -> dict:
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def status(running=0) -> ReplicaStatus:
    return ReplicaStatus("x", True, running, 0, 0.0, 1, 10, 1, 0, 0)


def cluster(now: float = 100.0) -> ClusterState:
    state = ClusterState([DeploymentSpec("chat", "mock", "m", replicas=2)])
    state.register_agent(AgentRegister(PROTOCOL_VERSION, "a1", "10.0.0.5", Capacity(2, 2**30)), now)
    state.reconcile(now)
    reports = [ReplicaReport(rid, "chat", "ready", "tcp://10.0.0.5:6000", pid=100 + i, status=status(),
                             metrics_endpoint="10.0.0.5:%d" % (9000 + i), cpu_percent=12.5, rss_bytes=2**20)
               for i, rid in enumerate(sorted(state.placements))]
    reports[1] = ReplicaReport(reports[1].replica_id, "chat", "starting", pid=0)  # not up yet: no target
    state.heartbeat(AgentHeartbeat("a1", 1, reports), now)
    return state


def fake_head(state: ClusterState) -> SimpleNamespace:
    return SimpleNamespace(state=state, tables=SimpleNamespace(version=7, epoch=3), recovering=False)


def test_sd_document_is_file_sd_sorted_and_deduplicated():
    doc = sd_document([Target("proxy", "10.0.0.9:8000", "10.0.0.9"),
                       Target("replica", "10.0.0.5:9001", "10.0.0.5", replica="r1", deployment="chat", agent="a1"),
                       Target("proxy", "10.0.0.9:8000", "10.0.0.9")])
    assert doc == [
        {"targets": ["10.0.0.9:8000"], "labels": {"role": "proxy", "host": "10.0.0.9"}},
        {"targets": ["10.0.0.5:9001"], "labels": {"role": "replica", "host": "10.0.0.5", "replica": "r1",
                                                  "deployment": "chat", "agent": "a1"}},
    ]
    assert host_of("[::1]:9100") == "::1" and host_of("h:1") == "h"


def test_write_atomic_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sd" / "targets.json"
    write_atomic(path, b"[1]")
    write_atomic(path, b"[2]")
    assert path.read_bytes() == b"[2]"
    assert [p.name for p in path.parent.iterdir()] == ["targets.json"]


def test_targets_cover_head_live_agents_their_started_replicas_and_proxies(tmp_path):
    state = cluster()
    m = HeadMetrics(port=-1, sd_file=str(tmp_path / "t.json"), static_proxies=("10.0.0.9:8000",))
    m.address = "10.0.0.1:7102"
    m.note(AgentRegister(PROTOCOL_VERSION, "a1", "10.0.0.5", Capacity(2, 2**30), metrics_endpoint="10.0.0.5:7200"))
    m.note(HeadHello(PROTOCOL_VERSION, "proxy", http_endpoint="10.0.0.8:8000"))
    m.note(HeadHello(PROTOCOL_VERSION, "cli"))
    m.update(fake_head(state), 100.0)
    doc = json.loads((tmp_path / "t.json").read_text())
    roles = sorted((e["labels"]["role"], e["targets"][0]) for e in doc)
    first = sorted(state.placements)[0]
    assert roles == [("agent", "10.0.0.5:7200"), ("head", "10.0.0.1:7102"), ("proxy", "10.0.0.8:8000"),
                     ("proxy", "10.0.0.9:8000"), ("replica", "10.0.0.5:9000")]
    replica = next(e for e in doc if e["labels"]["role"] == "replica")
    assert replica["labels"] == {"role": "replica", "host": "10.0.0.5", "replica": first, "deployment": "chat",
                                 "agent": "a1"}
    # an agent that stops heartbeating leaves the list with its replicas
    state.expire_agents(200.0)
    m.update(fake_head(state), 200.0)
    assert sorted(e["labels"]["role"] for e in json.loads((tmp_path / "t.json").read_text())) == \
        ["head", "proxy", "proxy"]


def test_sd_file_is_rewritten_only_on_change_and_updates_are_throttled(tmp_path):
    state = cluster()
    path = tmp_path / "t.json"
    m = HeadMetrics(port=-1, sd_file=str(path), static_proxies=("p:1",))
    m.update(fake_head(state), 100.0)
    first = path.stat().st_mtime_ns
    path.write_text("tampered")  # only rewritten when the target list changes
    m.update(fake_head(state), 101.5)
    assert path.read_text() == "tampered"
    m.note(HeadHello(PROTOCOL_VERSION, "proxy", http_endpoint="p:2"))
    m.update(fake_head(state), 101.6)  # within UPDATE_INTERVAL of the last: skipped
    assert path.read_text() == "tampered"
    m.update(fake_head(state), 103.0)
    assert "p:2" in path.read_text() and path.stat().st_mtime_ns >= first


def test_collector_reports_the_snapshot():
    state = cluster()
    m = HeadMetrics(port=-1)
    m.observe_reconcile(0.0004)
    m.update(fake_head(state), 100.0)
    s = samples(m.registry)
    assert s[("tokenrelay_head_deployments", ())] == 1
    assert s[("tokenrelay_head_deployment_desired_replicas", (("deployment", "chat"),))] == 2
    assert s[("tokenrelay_head_deployment_ready_replicas", (("deployment", "chat"),))] == 1
    assert s[("tokenrelay_head_deployment_state", (("deployment", "chat"), ("state", "degraded")))] == 1
    assert s[("tokenrelay_head_deployment_state", (("deployment", "chat"), ("state", "healthy")))] == 0
    assert s[("tokenrelay_head_replicas", (("deployment", "chat"), ("state", "ready")))] == 1
    assert s[("tokenrelay_head_replicas", (("deployment", "chat"), ("state", "starting")))] == 1
    assert s[("tokenrelay_head_agents", ())] == 1
    assert s[("tokenrelay_head_routing_table_version", ())] == 7
    assert s[("tokenrelay_head_routing_table_epoch", ())] == 3
    assert s[("tokenrelay_head_recovering", ())] == 0
    assert s[("tokenrelay_head_reconcile_duration_seconds_count", ())] == 1
    assert s[("tokenrelay_head_discovery_targets", (("role", "replica"),))] == 1
    assert any(name.startswith("process_") or name.startswith("python_") for name, _ in s)  # default registry


def test_summarize_counts_unknown_states_too():
    rows, counts = summarize([DeploymentStatus("d", "mock", "m", 1, ready_replicas=0, state="pending",
                                               replica_list=[ReplicaStatusRow("r", "a", "h", "weird", 1)])])
    assert rows == (("d", 1, 0, "pending"),)
    assert ("d", "weird", 1) in counts and ("d", "ready", 0) in counts


def test_enrich_status_adds_usage_and_endpoints():
    state = cluster()
    m = HeadMetrics(port=-1)
    m.note(AgentRegister(PROTOCOL_VERSION, "a1", "10.0.0.5", Capacity(2, 2**30), metrics_endpoint="10.0.0.5:7200"))
    m.note(AgentHeartbeat("a1", 2, [], usage=AgentUsage(55.0, 3 * 2**30, [GpuUsage(0, 0.5, 2**30, 2**34)])))
    deployments, agents = state.status(100.0, 1000.0)
    m.enrich_status(state, deployments, agents)
    ready = next(r for r in deployments[0].replica_list if r.state == "ready")
    assert ready.cpu_percent == 12.5 and ready.rss_bytes == 2**20
    assert ready.metrics_endpoint.startswith("10.0.0.5:")
    assert agents[0].cpu_percent == 55.0 and agents[0].rss_bytes == 3 * 2**30
    assert agents[0].gpu_usage == [GpuUsage(0, 0.5, 2**30, 2**34)]
    assert agents[0].metrics_endpoint == "10.0.0.5:7200"


def test_no_key_can_grow_the_proxy_discovery_list_without_bound():
    """A proxy (or any key allowed HeadHello) announcing address after address keeps only its newest
    MAX_PROXY_ENDPOINTS_PER_KEY; other keys' and the config's addresses stay."""
    from head.metrics import MAX_PROXY_ENDPOINTS_PER_KEY
    m = HeadMetrics(port=-1, static_proxies=("static:1",))
    m.note(HeadHello(PROTOCOL_VERSION, "proxy", http_endpoint="edge1:8000"), "key-edge1")
    for port in range(1000):
        m.note(HeadHello(PROTOCOL_VERSION, "proxy", http_endpoint="flood:%d" % port), "key-hostile")
    m.note(HeadHello(PROTOCOL_VERSION, "proxy", http_endpoint="static:1"), "key-hostile")
    assert list(m.proxies) == ["static:1", "edge1:8000"] + [
        "flood:%d" % p for p in range(1000 - MAX_PROXY_ENDPOINTS_PER_KEY, 1000)]
    assert m.proxies["static:1"] == "static"
