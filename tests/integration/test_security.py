"""Attacks on a secure-by-default cluster (real head, agent, replica and proxy processes), one test each.

Each attacker is a ZeroMQ socket in this test process: without a key, with a key the registry does not
know, or with a registered key of the wrong role. Every attack must be refused, logged with the key's
name and counted in tokenrelay_*_auth_refused_total{role,reason}, while a load test alongside sees no
failed request. The replay test also runs against an --insecure head, to show what CURVE prevents.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest
import zmq

from runtime import curve, head_client, keyring
from runtime.credentials import client_token
from runtime.head_client import HeadUnreachable
from runtime.protocol import (
    PROTOCOL_VERSION, TABLE_TOPIC, AgentHeartbeat, AgentRegister, Capacity, ControlReply, DeployRequest,
    GenerateRequest, HeadHello, ReplicaReport, RequestError, ScaleRequest, SnapshotRequest, decode_frames, encode,
)
from tests.integration.cluster import Cluster
from tests.integration.stack import ROOT, free_port, wait_for
from tests.integration.test_faults import StreamingClients

pytestmark = pytest.mark.integration

MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 1,
        "engine_args": {"ttft_ms": 5, "itl_ms": 5, "tokens": 20}, "drain_seconds": 1}
NO_ANSWER = 1.5  # seconds an attacker waits; a legitimate answer comes within milliseconds


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("sec"), [MOCK], proxy_workers=1)
    c.head_metrics = free_port()
    c.start_head("--metrics-port", str(c.head_metrics))
    # as on separate hosts: the proxy and the agent each run from the files `tokenrelay keys add` wrote
    # for them (the proxy first: the agent's files carry the proxy keys its replicas accept)
    proxy_host, vm_host = c.tmp / "proxy-host", c.tmp / "vm-host"
    keyring.add(c.keys, "proxy", "edge", out=proxy_host)
    keyring.add(c.keys, "agent", "vm", out=vm_host)
    c._spawn("agent-vm", ["agent", "--head", c.head, "--host", "127.0.0.2", "--agent-id", "vm",
                          "--curve-dir", str(vm_host)])
    c._spawn("proxy", ["proxy", "--head", c.head, "--bind", "127.0.0.1:%d" % c.http_port, "--workers", "1",
                       "--curve-dir", str(proxy_host)])
    c.proxy_keys = proxy_host
    c.evil = c.tmp / "evil-host"  # a registered agent whose host the attacker owns
    keyring.add(c.keys, "agent", "evil", out=c.evil)
    try:
        c.wait_ready("mock", 1)
        c.load = StreamingClients(c.base_url, 2, max_tokens=10).start()
        yield c
        outcomes = c.load.stop()
        assert set(outcomes) == {"ok"} and outcomes["ok"] > 10, outcomes  # legitimate traffic unaffected
    finally:
        c.stop_all()


def dealer(endpoint: str, me: Optional[keyring.Identity] = None, server: bytes = b"") -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if me is not None:
        curve.connect(sock, me, server)
    sock.connect(endpoint)
    return sock


def ask(sock: zmq.Socket, msg: Any, wait: float = NO_ANSWER) -> Optional[Any]:
    """Send `msg`; the decoded answer, or None if none came within `wait` seconds."""
    sock.send_multipart(encode(msg))
    answer = decode_frames(sock.recv_multipart()) if sock.poll(int(wait * 1000)) else None
    sock.close(0)
    return answer


def stranger() -> keyring.Identity:
    public, secret = zmq.curve_keypair()
    return keyring.Identity("agent", "stranger", public, secret)


def refused(address: str, prefix: str) -> dict[tuple[str, str], float]:
    """{(role, reason): count} of `prefix`auth_refused_total at a /metrics endpoint."""
    text = httpx.get("http://%s/metrics" % address, timeout=2).text
    out = {}
    for m in re.finditer(r'^%sauth_refused_total\{(.*?)\} (\S+)$' % prefix, text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out[(labels["role"], labels["reason"])] = float(m.group(2))
    return out


def head_refused(c: Cluster) -> dict[tuple[str, str], float]:
    return refused("127.0.0.1:%d" % c.head_metrics, "tokenrelay_head_")


def replica(c: Cluster) -> dict:
    return c.replicas("mock")[0]


def heartbeat_for(agent_id: str, reports: list[ReplicaReport] = ()) -> AgentHeartbeat:
    return AgentHeartbeat(agent_id, 10_000, list(reports))


def register(agent_id: str, reports: list[ReplicaReport] = ()) -> AgentRegister:
    return AgentRegister(PROTOCOL_VERSION, agent_id, "127.0.0.9", Capacity(8, 1 << 34), {}, list(reports))


def head_key(c: Cluster) -> bytes:
    return keyring.server_public(c.keys, "head")


def test_fake_agent_registration_without_a_key_or_with_an_unknown_key(cluster):
    assert ask(dealer(cluster.head), register("fake")) is None  # plain: the CURVE handshake never completes
    assert ask(dealer(cluster.head, stranger(), head_key(cluster)), register("fake")) is None
    wait_for(lambda: head_refused(cluster).get(("unknown", "unknown_key"), 0) >= 1, 5, "the refusal counted")
    assert "[auth] refused key" in cluster.log("head") and "fake" not in cluster.status()["agents"]


def test_heartbeat_hijack_of_the_real_agents_id(cluster):
    before = replica(cluster)
    evil = keyring.identity(cluster.evil, "agent", "evil")
    hijack = ReplicaReport(before["replica_id"], "mock", "ready", endpoint="tcp://127.0.0.9:9")
    assert ask(dealer(cluster.head), heartbeat_for("vm", [hijack])) is None
    answer = ask(dealer(cluster.head, evil, head_key(cluster)), heartbeat_for("vm", [hijack]))
    assert isinstance(answer, ControlReply) and answer.code == "forbidden" and "agent_id" in answer.message
    assert "[auth] refused agent-evil AgentHeartbeat for agent vm: agent_id" in cluster.log("head")
    assert head_refused(cluster)[("agent", "agent_id")] >= 1
    assert replica(cluster)["endpoint"] == before["endpoint"]


def test_replica_report_for_a_replica_the_agent_does_not_own(cluster):
    before = replica(cluster)
    evil = keyring.identity(cluster.evil, "agent", "evil")
    steal = ReplicaReport(before["replica_id"], "mock", "ready", endpoint="tcp://127.0.0.9:9")
    answer = ask(dealer(cluster.head, evil, head_key(cluster)), register("evil", [steal]))
    assert isinstance(answer, ControlReply) and answer.ok  # evil may be itself, but not own vm's replica
    assert "report for replica %s of agent vm: replica_not_owned" % before["replica_id"] in cluster.log("head")
    assert head_refused(cluster)[("agent", "replica_not_owned")] >= 1
    assert replica(cluster)["endpoint"] == before["endpoint"] and replica(cluster)["host"] != "127.0.0.9"


def test_direct_generation_on_a_replica_data_port(cluster):
    rep = replica(cluster)
    request = GenerateRequest("attack-1", prompt="tell me")
    replica_key = keyring.server_public(cluster.keys, "replica")
    assert ask(dealer(rep["endpoint"]), request) is None  # no key
    for me in (stranger(), keyring.identity(cluster.keys, "operator"),  # unknown key; registered, not a proxy
               keyring.identity(cluster.evil, "agent", "evil")):
        assert ask(dealer(rep["endpoint"], me, replica_key), request) is None
    # an agent host's registry holds only the proxies' keys: any other key is unknown to its replicas
    counts = refused(rep["metrics_endpoint"], "tokenrelay_replica_")
    assert counts[("unknown", "unknown_key")] >= 3
    assert "[auth] refused key %s on replica: unknown_key" % keyring.z85_public(
        cluster.keys / ("operator-%s.key_secret" % keyring.local_name())).decode()[:8] in cluster.log("agent-vm")
    held = sorted(str(p.relative_to(cluster.tmp / "vm-host")) for p in (cluster.tmp / "vm-host").rglob("*"))
    assert [p for p in held if not p.startswith("registry/")] == [  # what an agent host holds
        "agent-vm.key_secret", "head.key", "registry", "replica.key", "replica.key_secret"]
    assert "registry/proxy-edge.key" in held
    assert all(p.startswith("registry/proxy-") for p in held if p.startswith("registry/"))


def test_revoked_proxy_key_gets_no_generation_on_its_open_replica_connection(cluster):
    """A proxy key revoked on the agent host while its connection to a replica stays open: ZAP saw it
    only at connect time, so the replica checks each GenerateRequest's key against the registry again."""
    vm_host = cluster.tmp / "vm-host"
    keyring.add(cluster.keys, "proxy", "edge3", out=cluster.tmp / "edge3-host")
    registered = vm_host / keyring.REGISTRY / "proxy-edge3.key"
    registered.write_bytes((cluster.keys / keyring.REGISTRY / "proxy-edge3.key").read_bytes())
    rep = replica(cluster)
    sock = dealer(rep["endpoint"], keyring.identity(cluster.tmp / "edge3-host", "proxy", "edge3"),
                  keyring.server_public(cluster.keys, "replica"))

    def answers(request_id: str) -> list[Any]:
        """What the replica sends about `request_id` until it finishes or fails."""
        sock.send_multipart(encode(GenerateRequest(request_id, prompt="hi")))
        out: list[Any] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sock.poll(int((deadline - time.monotonic()) * 1000)):
            msg = decode_frames(sock.recv_multipart())
            deltas = [d for d in getattr(msg, "deltas", []) if d.request_id == request_id]
            out += deltas if deltas else [msg] if getattr(msg, "request_id", None) == request_id else []
            if out and (isinstance(out[-1], RequestError) or getattr(out[-1], "finish_reason", None)):
                break
        return out

    try:
        assert any(getattr(m, "text", "") for m in answers("edge3-1"))  # registered: served
        (vm_host / keyring.REVOKED).mkdir(exist_ok=True)
        registered.replace(vm_host / keyring.REVOKED / "proxy-edge3.key")  # the docs' revocation on an agent host
        after = answers("edge3-2")  # same connection
        assert [type(m).__name__ for m in after] == ["RequestError"] and after[0].status == 403, after
    finally:
        sock.close(0)
    assert refused(rep["metrics_endpoint"], "tokenrelay_replica_")[("proxy", "revoked")] >= 1
    assert "[auth] refused proxy-edge3 request edge3-2: revoked" in cluster.log("agent-vm")


def test_snapshot_and_subscription_without_a_key(cluster):
    assert ask(dealer(cluster.head), SnapshotRequest(PROTOCOL_VERSION)) is None
    assert ask(dealer(cluster.head), HeadHello(PROTOCOL_VERSION, "proxy")) is None
    subs = []
    for me in (None, keyring.identity(cluster.evil, "agent", "evil")):  # no key; an agent key (wrong role)
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, TABLE_TOPIC)
        if me is not None:
            curve.connect(sub, me, head_key(cluster))
        sub.connect(cluster.publish)
        subs.append(sub)
    try:
        time.sleep(2.5)  # the head republishes its table every second: a subscriber would have two by now
        assert [s.poll(0) for s in subs] == [0, 0]
    finally:
        for s in subs:
            s.close(0)
    assert head_refused(cluster)[("agent", "role")] >= 1
    assert "[auth] refused agent-evil on publish: role" in cluster.log("head")


def test_proxy_key_sending_agent_messages(cluster):
    proxy = keyring.identity(cluster.proxy_keys, "proxy")
    answer = ask(dealer(cluster.head, proxy, head_key(cluster)), heartbeat_for("vm"))
    assert isinstance(answer, ControlReply) and answer.code == "forbidden"
    answer = ask(dealer(cluster.head, proxy, head_key(cluster)), register("proxy-as-agent"))
    assert isinstance(answer, ControlReply) and answer.code == "forbidden"
    assert "[auth] refused proxy-edge AgentHeartbeat for agent vm: role" in cluster.log("head")
    assert head_refused(cluster)[("proxy", "role")] >= 2 and "proxy-as-agent" not in cluster.status()["agents"]


def test_operator_command_with_a_proxy_key(cluster):
    proxy = keyring.identity(cluster.proxy_keys, "proxy")
    token = client_token(None, str(cluster.state_dir))  # even with the admin token
    for msg in (ScaleRequest(token, "mock", 0), DeployRequest(token, dict(MOCK, name="evil"))):
        answer = ask(dealer(cluster.head, proxy, head_key(cluster)), msg)
        assert isinstance(answer, ControlReply) and answer.code == "forbidden" and "role" in answer.message
    st = cluster.status()["deployments"]
    assert set(st) == {"mock"} and st["mock"]["replicas"] == 1


def test_revoked_key_is_refused_from_its_next_connection_and_message(cluster):
    ops = cluster.tmp / "ops-host"
    keyring.add(cluster.keys, "operator", "ops2", out=ops)
    (ops / "head.key").unlink()  # the CLI reads head.key from its key dir: give it the cluster's
    (ops / "head.key").write_bytes((cluster.keys / "head.key").read_bytes())
    token = client_token(None, str(cluster.state_dir))
    assert head_client.status(cluster.head, token, keys=ops).deployments  # works before
    me = keyring.identity(ops, "operator", "ops2")
    open_conn = dealer(cluster.head, me, head_key(cluster))
    open_conn.send_multipart(encode(ScaleRequest(token, "mock", 1)))
    assert open_conn.poll(3000)
    open_conn.recv_multipart()
    out = subprocess.run([sys.executable, "-m", "runtime", "keys", "revoke", "operator", "ops2",
                          "--dir", str(cluster.keys)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    with pytest.raises(HeadUnreachable):  # a new connection: refused by ZAP
        head_client.status(cluster.head, token, timeout=NO_ANSWER, keys=ops)
    answer = ask(open_conn, ScaleRequest(token, "mock", 0), wait=3)  # the connection made before
    assert isinstance(answer, ControlReply) and answer.code == "forbidden" and "revoked" in answer.message
    assert head_refused(cluster)[("operator", "revoked")] >= 2
    assert cluster.status()["deployments"]["mock"]["replicas"] == 1


# ------------------------------------------------------------------ replay


class Recorder(threading.Thread):
    """A TCP relay to the head that records what the client sends (an attacker on the wire)."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent: list[bytes] = []

    def run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        for a, b, record in ((client, server, True), (server, client, False)):
            threading.Thread(target=self._pump, args=(a, b, record), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    self.sent.append(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()


def replay(target: tuple[str, int], chunks: list[bytes]) -> socket.socket:
    """Send what the client sent, piece by piece as it did, reading the server's answer to each piece
    before the next (libzmq's handshake is lock-step); the connection is returned."""
    sock = socket.create_connection(target, timeout=0.5)
    for chunk in chunks:
        try:
            sock.sendall(chunk)
            sock.recv(65536)
        except socket.timeout:  # nothing to answer to this piece (e.g. a ZMTP command): go on
            continue
        except OSError:  # hung up
            break
    sock.settimeout(10)
    return sock


def hung_up(sock: socket.socket) -> bool:
    """True when the server closes the connection (within the socket's timeout), reading what it sends."""
    try:
        while sock.recv(65536):
            pass
        return True
    except OSError:  # timed out: the server kept the connection
        return False


@pytest.mark.parametrize("insecure", [False, True], ids=["curve", "insecure"])
def test_captured_and_replayed_deploy_is_refused(tmp_path, monkeypatch, insecure):
    c = Cluster(tmp_path, [], insecure=insecure)
    keys: Optional[Path] = None if insecure else c.keys
    if insecure:
        monkeypatch.setenv("TOKENRELAY_INSECURE", "1")
    c.start_head()
    try:
        token = wait_for(lambda: client_token(None, str(c.state_dir)), 10, "the admin token")
        wait_for(lambda: c.try_status() is not None, 15, "the head")
        host, port = c.head.rsplit("/", 1)[1].split(":")
        rec = Recorder((host, int(port)))
        rec.start()
        spec = dict(MOCK, name="replayed", replicas=0)
        head_client.deploy("tcp://127.0.0.1:%d" % rec.port, token, spec, keys=keys)
        head_client.delete(c.head, token, "replayed", keys=keys)
        assert "replayed" not in c.status()["deployments"]
        with replay((host, int(port)), rec.sent) as sock:
            if insecure:  # plain ZeroMQ executes the replayed deploy
                wait_for(lambda: "replayed" in c.status()["deployments"], 10, "the replayed deploy")
            else:  # CURVE: the replayed INITIATE's cookie is not this session's: the head hangs up
                assert hung_up(sock), "the head kept a replayed CURVE connection open"
                assert "replayed" not in c.status()["deployments"]
    finally:
        c.stop_all()


def test_agent_and_replica_metrics_listen_on_loopback_unless_configured(cluster):
    agent = cluster.status()["agents"]["vm"]  # the agent's --host is 127.0.0.2, its replicas bind there
    for address in (agent["metrics_endpoint"], replica(cluster)["metrics_endpoint"]):
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and httpx.get("http://%s/metrics" % address, timeout=2).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get("http://127.0.0.2:%s/metrics" % port, timeout=2)
