"""The head's reactor with real sockets in one process: admin commands, auth, persistence, recovery."""
import json
import threading

import pytest
import zmq

from head.config import HeadConfig
from head.server import Head
from head.store import StateStore
from runtime import head_client
from runtime.head_client import HeadRefused
from runtime.stack_config import parse_deployment
from runtime.protocol import (
    PROTOCOL_VERSION, AgentHeartbeat, AgentRegister, Assignment, Capacity, ControlReply, HeadHello, HeadInfo,
    ReplicaReport, ReplicaStatus, RoutingTable, SnapshotRequest, decode_frames, encode,
)

TOKEN = "s3cret"


@pytest.fixture(autouse=True)
def plain_cli(monkeypatch):
    """These heads run without CURVE keys (HeadConfig has no curve_dir): the CLI talks to them in plain
    text only when told to, as an operator of an --insecure head must."""
    monkeypatch.setenv("TOKENRELAY_INSECURE", "1")


class RunningHead:
    def __init__(self, db, recovery_grace=0.0, seed=(), reset=False):
        cfg = HeadConfig(control="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", recovery_grace=recovery_grace)
        self.head = Head(cfg, StateStore(db), TOKEN, seed, reset=reset)
        self.head.bind()
        self.endpoint = self.head.control_endpoint
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import signal
        real = signal.signal
        signal.signal = lambda *a: None  # only the main thread may install handlers
        try:
            self.head.run()
        finally:
            signal.signal = real

    def stop(self):
        self.head.stop()
        self.thread.join(5)
        self.head.store.close()


@pytest.fixture
def head(tmp_path):
    h = RunningHead(tmp_path / "head.db")
    yield h
    h.stop()


def _dealer(endpoint):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _recv(sock, timeout=3.0):
    assert sock.poll(timeout * 1000), "no reply"
    return decode_frames(sock.recv_multipart())


def test_admin_commands_need_the_token(head):
    # a wrong token is told apart from none ("admin token required: pass --token" read as if --token
    # had been ignored)
    with pytest.raises(HeadRefused, match="unauthorized: wrong admin token"):
        head_client.status(head.endpoint, "wrong")
    with pytest.raises(HeadRefused, match="unauthorized: admin token required: pass --token"):
        head_client.deploy(head.endpoint, "", {"name": "x", "engine": "mock"})


def test_deploy_validates_and_is_idempotent(head):
    with pytest.raises(HeadRefused, match=r"invalid_spec: spec.replicas: must be an integer >= 0"):
        head_client.deploy(head.endpoint, TOKEN, {"name": "x", "engine": "mock", "replicas": -2})
    spec = {"name": "x", "engine": "mock", "replicas": 1}
    assert head_client.deploy(head.endpoint, TOKEN, spec)["result"] == "created"
    assert head_client.deploy(head.endpoint, TOKEN, spec)["result"] == "unchanged"
    assert head_client.scale(head.endpoint, TOKEN, "x", 3)["result"] == "scaled"
    with pytest.raises(HeadRefused, match="not_found"):
        head_client.scale(head.endpoint, TOKEN, "nope", 1)
    with pytest.raises(HeadRefused, match=r"invalid_spec: replicas: must be at most 1024"):
        head_client.scale(head.endpoint, TOKEN, "x", 10**6, timeout=3.0)  # a typo, answered at once
    with pytest.raises(HeadRefused, match=r"must be at most 1024"):
        head_client.deploy(head.endpoint, TOKEN, {"name": "y", "engine": "mock", "replicas": 10**6})
    d = {d.name: d for d in head_client.status(head.endpoint, TOKEN).deployments}["x"]
    assert d.replicas == 3 and d.state == "pending" and d.pending_reason == "no agent registered"
    assert head_client.delete(head.endpoint, TOKEN, "x")["result"] == "deleted"
    assert head_client.delete(head.endpoint, TOKEN, "x")["result"] == "absent"


def test_deployments_survive_a_restart_and_recovery_publishes_nothing(tmp_path):
    h = RunningHead(tmp_path / "head.db")
    head_client.deploy(h.endpoint, TOKEN, {"name": "keep", "engine": "mock", "replicas": 2})
    epoch1 = h.head.tables.epoch
    h.stop()
    h2 = RunningHead(tmp_path / "head.db", recovery_grace=30.0)
    try:
        assert h2.head.tables.epoch > epoch1
        names = [d.name for d in head_client.status(h2.endpoint, TOKEN).deployments]
        assert names == ["keep"]
        proxy = _dealer(h2.endpoint)
        proxy.send_multipart(encode(HeadHello(PROTOCOL_VERSION, "proxy")))
        info = _recv(proxy)
        assert isinstance(info, HeadInfo) and info.epoch == h2.head.tables.epoch
        proxy.send_multipart(encode(SnapshotRequest(PROTOCOL_VERSION)))
        reply = _recv(proxy)
        assert isinstance(reply, ControlReply) and reply.code == "recovering"
        proxy.close(0)
    finally:
        h2.stop()


def test_agent_register_heartbeat_and_table(head):
    head_client.deploy(head.endpoint, TOKEN, {"name": "d", "engine": "mock", "replicas": 1})
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"table")
    sub.connect(head.head.publish_endpoint)
    agent = _dealer(head.endpoint)
    agent.send_multipart(encode(AgentHeartbeat("a1", 1, [])))
    assert _recv(agent).code == "unknown_agent"
    agent.send_multipart(encode(AgentRegister(PROTOCOL_VERSION, "a1", "h", Capacity(2, 1 << 30))))
    assert _recv(agent).ok
    assignment = _recv(agent)
    assert isinstance(assignment, Assignment) and len(assignment.replicas) == 1
    spec = assignment.replicas[0]
    st = ReplicaStatus(spec.replica_id, True, 0, 0, 0.0, 0, 0, 0, 0, 0)
    agent.send_multipart(encode(AgentHeartbeat("a1", 2, [ReplicaReport(
        spec.replica_id, "d", "ready", "tcp://127.0.0.1:9", 1, status=st, generation=spec.generation)])))
    deadline_tables = []
    while not deadline_tables:
        assert sub.poll(3000)
        table = decode_frames(sub.recv_multipart())
        assert isinstance(table, RoutingTable)
        if table.deployments and table.deployments[0].replicas:
            deadline_tables.append(table)
    assert deadline_tables[0].deployments[0].replicas[0].endpoint == "tcp://127.0.0.1:9"
    agent.send_multipart([b"\x99", b"garbage"])
    reply = _recv(agent)
    while isinstance(reply, Assignment):  # answers to the heartbeat above
        reply = _recv(agent)
    assert reply.code == "protocol"
    sub.close(0)
    agent.close(0)


def test_a_change_that_cannot_be_placed_is_refused_and_changes_nothing(head):
    head_client.deploy(head.endpoint, TOKEN, {"name": "v", "engine": "vllm", "model": "m", "replicas": 1})
    agent = _dealer(head.endpoint)
    agent.send_multipart(encode(AgentRegister(PROTOCOL_VERSION, "a1", "h", Capacity(2, 1 << 30))))
    assert _recv(agent).ok
    assert head_client.scale(head.endpoint, TOKEN, "v", 2)["result"] == "scaled"  # one core each
    with pytest.raises(HeadRefused, match=r"unplaceable: only 2 of 3 replica\(s\) of v fit: a1: 0 of 2 CPU"):
        head_client.scale(head.endpoint, TOKEN, "v", 3)
    with pytest.raises(HeadRefused, match="unplaceable"):
        head_client.deploy(head.endpoint, TOKEN, {"name": "w", "engine": "mock", "cpus": 4})
    status = {d.name: d for d in head_client.status(head.endpoint, TOKEN).deployments}
    assert status["v"].replicas == 2 and "w" not in status
    assert head_client.scale(head.endpoint, TOKEN, "v", 1)["result"] == "scaled"
    agent.close(0)


def test_config_seeds_a_new_state_only_and_later_starts_keep_what_scale_and_deploy_set(tmp_path, caplog):
    from runtime.stack_config import DeploymentSpec
    db = tmp_path / "head.db"
    seed = (DeploymentSpec("m", "mock", "m", replicas=1),)
    h = RunningHead(db, seed=seed)
    assert h.head.state.deployments["m"].replicas == 1
    head_client.scale(h.endpoint, TOKEN, "m", 3)
    head_client.deploy(h.endpoint, TOKEN, {"name": "extra", "engine": "mock"})
    h.stop()
    caplog.set_level("INFO")
    h = RunningHead(db, seed=seed)  # `tokenrelay up` again with the same file
    assert h.head.state.deployments["m"].replicas == 3 and "extra" in h.head.state.deployments
    assert "deployment m differs from the config: replicas 3 (file: 1); keeping the state" in caplog.text
    head_client.delete(h.endpoint, TOKEN, "m")
    h.stop()
    h = RunningHead(db, seed=seed)  # deleted stays deleted
    assert "m" not in h.head.state.deployments
    h.stop()
    h = RunningHead(db, seed=seed, reset=True)  # --reset-deployments: the file wins
    assert set(h.head.state.deployments) == {"m"} and h.head.state.deployments["m"].replicas == 1
    h.stop()


def test_scale_of_an_autoscaled_deployment_is_refused_with_the_knob_to_change(head):
    head_client.deploy(head.endpoint, TOKEN, {"name": "a", "engine": "mock",
                                              "autoscaling": {"min_replicas": 1, "max_replicas": 3}})
    with pytest.raises(HeadRefused, match=r"autoscaled: a is autoscaled between 1 and 3 replicas; change "
                                          r"autoscaling.min_replicas/max_replicas"):
        head_client.scale(head.endpoint, TOKEN, "a", 5)


def test_an_answer_the_head_cannot_encode_is_an_error_not_silence(head, monkeypatch):
    """Before, an OverflowError in the reply's encoding was logged and the CLI waited out its timeout
    ("no answer from the head")."""
    monkeypatch.setattr(head.head, "_admin", lambda msg, now: ControlReply(True, data={"n": 10**20}))
    with pytest.raises(HeadRefused, match="internal: the head could not encode its ControlReply"):
        head_client.status(head.endpoint, TOKEN)


def test_a_stored_spec_that_no_longer_validates_is_skipped_not_fatal(tmp_path, caplog):
    """A spec stored by an older head (a count msgpack cannot carry) made the head fail to start."""
    store = StateStore(tmp_path / "head.db")
    store.put(parse_deployment({"name": "good", "engine": "mock"}), 1)
    bad = dict(parse_deployment({"name": "bad", "engine": "mock"}).to_dict(), max_ongoing_requests=10**20)
    store._db.execute("INSERT INTO deployments VALUES (?, ?, ?, ?)", ("bad", json.dumps(bad), 1, 0.0))
    assert [spec.name for spec, _ in store.load()] == ["good"]
    assert "no longer valid, not loaded" in caplog.text
    store.close()
