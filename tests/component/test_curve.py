"""CURVE on the head's control socket: a registered key gets answers for its role, others get nothing."""
import threading
import time

import pytest
import zmq

from head.config import HeadConfig
from head.server import Head
from head.store import StateStore
from runtime import authz, curve, head_client, keyring
from runtime.head_client import HeadRefused, HeadUnreachable, NoOperatorKey
from runtime.zap import RefusalLog
from tests.support import free_port


def test_curve_head_answers_only_registered_keys_by_role(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keyring.ensure_single_host(keys, "a")
    with pytest.raises(keyring.KeyFileError, match="already holds"):
        keyring.init_cluster(keys)
    cfg = HeadConfig(control="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", recovery_grace=0.0,
                     curve_dir=str(keys))
    ctx = zmq.Context()
    head = Head(cfg, StateStore(None), "tok", ctx=ctx)
    head.bind()
    monkeypatch.setattr("signal.signal", lambda *a: None)
    thread = threading.Thread(target=head.run, daemon=True)
    thread.start()
    try:
        # no keys: the handshake never completes, so the request times out (and is never processed)
        monkeypatch.setenv("TOKENRELAY_INSECURE", "1")
        with pytest.raises(HeadUnreachable):
            head_client.status(head.control_endpoint, "tok", timeout=0.5)
        monkeypatch.delenv("TOKENRELAY_INSECURE")
        # a stranger's key (its own cluster) is refused by ZAP
        other = tmp_path / "other"
        keyring.ensure_single_host(other, None)
        (other / "head.key").write_bytes((keys / "head.key").read_bytes())
        with pytest.raises(HeadUnreachable):
            head_client.status(head.control_endpoint, "tok", timeout=0.5, keys=other)
        # the operator key works; a proxy key may not deploy
        assert head_client.status(head.control_endpoint, "tok", timeout=3, keys=keys).deployments == []
        proxy_only = tmp_path / "proxy-only"
        keyring.add(keys, "proxy", "p2", out=proxy_only)
        (proxy_only / "operator-p2.key_secret").write_bytes((proxy_only / "proxy-p2.key_secret").read_bytes())
        with pytest.raises(HeadRefused, match="forbidden.*proxy-p2 may not send DeployRequest"):
            head_client.deploy(head.control_endpoint, "tok", {"name": "x"}, timeout=3, keys=proxy_only)
        refused = {tuple(s.labels.values()): s.value for m in head.metrics.registry.collect()
                   if m.name == "tokenrelay_head_auth_refused" for s in m.samples if s.name.endswith("_total")}
        assert refused[("unknown", "unknown_key")] >= 1 and refused[("proxy", "role")] == 1
    finally:
        head.stop()
        thread.join(5)
        ctx.term()


def test_a_curve_server_without_a_running_zap_handler_admits_nobody(tmp_path):
    """libzmq's default admits every client key when no ZAP handler answers; curve.serve fails closed."""
    keys = tmp_path / "keys"
    keyring.ensure_single_host(keys, "a")
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    client = ctx.socket(zmq.DEALER)
    try:
        server.setsockopt(zmq.LINGER, 0)
        client.setsockopt(zmq.LINGER, 0)
        curve.serve(server, keyring.server_pair(keys, "replica"), authz.REPLICA_DATA)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        stranger_public, stranger_secret = zmq.curve_keypair()  # a key no registry knows
        curve.connect(client, keyring.Identity("proxy", "x", stranger_public, stranger_secret),
                      keyring.server_public(keys, "replica"))
        client.connect("tcp://127.0.0.1:%d" % port)
        client.send(b"hello")
        assert server.poll(1000) == 0  # with libzmq's default this arrives at once
    finally:
        client.close(0)
        server.close(0)
        ctx.term()


def test_the_cli_never_sends_the_admin_token_in_clear_text_unless_told_to(tmp_path, monkeypatch, caplog):
    """No operator key, or several and none named: nothing leaves the CLI (a plain listener on the head's
    port would read the token). $TOKENRELAY_OPERATOR picks one of several; $TOKENRELAY_INSECURE=1 sends
    in clear text, loudly."""
    monkeypatch.delenv("TOKENRELAY_INSECURE", raising=False)
    monkeypatch.delenv("TOKENRELAY_OPERATOR", raising=False)
    ctx = zmq.Context()
    spy = ctx.socket(zmq.ROUTER)  # what a sniffer or an impostor bound to the head's port would read
    spy.setsockopt(zmq.LINGER, 0)
    port = spy.bind_to_random_port("tcp://127.0.0.1")
    endpoint = "tcp://127.0.0.1:%d" % port
    keys = tmp_path / "keys"
    try:
        with pytest.raises(NoOperatorKey, match="holds 0 operator keys"):
            head_client.status(endpoint, "S3CRET", timeout=0.2, keys=tmp_path / "no-keys-here")
        keyring.init_cluster(keys)
        keyring.add(keys, "operator", "me")
        keyring.add(keys, "operator", "alice")
        with pytest.raises(NoOperatorKey, match="holds 2 operator keys.*TOKENRELAY_OPERATOR=NAME"):
            head_client.status(endpoint, "S3CRET", timeout=0.2, keys=keys)
        assert spy.poll(200) == 0  # nothing was sent
        monkeypatch.setenv("TOKENRELAY_OPERATOR", "alice")
        with pytest.raises(HeadUnreachable, match="as operator-alice.*started with --insecure answers only with "
                                                  r"\$TOKENRELAY_INSECURE=1"):  # a plain head is silent too
            head_client.status(endpoint, "S3CRET", timeout=0.3, keys=keys)
        assert spy.poll(200) == 0  # a CURVE client: the plain listener gets no message
        monkeypatch.setenv("TOKENRELAY_INSECURE", "1")  # explicit, but still not silent
        with pytest.raises(HeadUnreachable, match="plain socket"):
            head_client.status(endpoint, "S3CRET", timeout=0.2)
        assert "$TOKENRELAY_INSECURE is set: sending to the head WITHOUT CURVE" in caplog.text
    finally:
        spy.close(0)
        ctx.term()


def test_an_agent_cannot_persist_bindings_for_replicas_the_head_never_placed_or_adopted(tmp_path):
    """Every replica id an agent key reported was bound to it in head.db for good: a hostile agent could
    grow the table without bound and squat ids the head would later give other agents (whose reports
    would then be refused). Only replicas the head places on (or adopts from) that agent are bound."""
    from runtime.keyring import Peer
    from runtime.stack_config import parse_deployment
    from runtime.protocol import (PROTOCOL_VERSION, AgentHeartbeat, AgentRegister, Capacity, ReplicaReport,
                                  encode)
    from runtime.zap import user_id

    keys = tmp_path / "keys"
    keyring.ensure_single_host(keys, "evil")
    cfg = HeadConfig(control="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", recovery_grace=0.0,
                     curve_dir=str(keys))
    ctx = zmq.Context()
    head = Head(cfg, StateStore(None), "tok", ctx=ctx)
    head.bind()
    try:
        evil = keyring.identity(keys, "agent", "evil")
        user = user_id(Peer("agent", "evil"), evil.public).decode()
        fake = [ReplicaReport("chat-%06x" % n, "chat", "ready", endpoint="tcp://127.0.0.9:%d" % (n + 1))
                for n in range(200)]
        for msg in (AgentRegister(PROTOCOL_VERSION, "evil", "127.0.0.9", Capacity(8, 1 << 34), {}, fake),
                    AgentHeartbeat("evil", 10_000, fake)):
            head._handle([b"evil-peer"] + encode(msg), user)
        assert "evil" in head.state.agents  # the agent itself is fine
        assert head.store.owners() == {}  # but owns nothing it was not given
        head._put(parse_deployment({"name": "chat", "engine": "mock", "model": "m", "replicas": 1}, "spec"))
        head.state.reconcile(head.clock())
        (placed,) = head.state.placements
        head._handle([b"evil-peer"] + encode(AgentHeartbeat("evil", 10_000, fake + [
            ReplicaReport(placed, "chat", "ready", endpoint="tcp://127.0.0.9:1")])), user)
        assert head.store.owners() == {placed: "evil"}  # what the head placed there is bound
    finally:
        head._control.close(0)
        head._pub.close(0)
        if head._auth is not None:
            head._auth.stop()
        head.metrics.close()
        ctx.term()


def test_connections_with_fresh_keys_in_a_loop_do_not_flood_the_heads_log(tmp_path, caplog):
    """Anyone who reaches the port can connect again and again with new keys: each refusal is counted,
    at most RefusalLog.TOTAL are logged (each was a WARNING line before)."""
    keys = tmp_path / "keys"
    keyring.ensure_single_host(keys, "a")
    cfg = HeadConfig(control="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", recovery_grace=0.0,
                     curve_dir=str(keys))
    ctx = zmq.Context()
    head = Head(cfg, StateStore(None), "tok", ctx=ctx)
    head.bind()
    attempts = RefusalLog.TOTAL + 20
    try:
        with caplog.at_level("WARNING"):
            for _ in range(attempts):
                client = ctx.socket(zmq.DEALER)
                client.setsockopt(zmq.LINGER, 0)
                public, secret = zmq.curve_keypair()
                curve.connect(client, keyring.Identity("proxy", "x", public, secret),
                              keyring.server_public(keys, "head"))
                client.connect(head.control_endpoint)
                client.send(b"x")
                count = head.metrics.auth_refused.labels("unknown", "unknown_key")
                before = count._value.get()
                deadline = time.monotonic() + 5
                while count._value.get() == before:
                    assert time.monotonic() < deadline, "no refusal counted"
                    time.sleep(0.01)
                client.close(0)
        logged = [r for r in caplog.records if "[auth] refused key" in r.getMessage()]
        assert head.metrics.auth_refused.labels("unknown", "unknown_key")._value.get() == attempts
        assert len(logged) == RefusalLog.TOTAL
    finally:
        head._control.close(0)
        head._pub.close(0)
        if head._auth is not None:
            head._auth.stop()
        head.metrics.close()
        ctx.term()


@pytest.mark.parametrize("trial", range(3))
def test_a_revoked_key_never_leaves_the_table_publisher_unbound(tmp_path, trial):
    """A revocation rebinds the head's PUB socket on the same port (every subscriber goes through ZAP
    again); libzmq frees the old socket's port asynchronously, so the first bind often fails. The head
    retries each tick: a legitimate proxy gets tables again on the same address."""
    keys = tmp_path / "keys"
    keyring.init_cluster(keys)
    keyring.add(keys, "proxy", "good")
    keyring.add(keys, "proxy", "bad")
    cfg = HeadConfig(control="tcp://127.0.0.1:%d" % free_port(), publish="tcp://127.0.0.1:%d" % free_port(),
                     curve_dir=str(keys), metrics_port=-1, recovery_grace=0.0)
    ctx = zmq.Context()
    head = Head(cfg, StateStore(None), "tok", ctx=ctx)
    head.bind()
    good = keyring.identity(keys, "proxy", "good")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    curve.connect(sub, good, keyring.server_public(keys, "head"))
    sub.connect(head.publish_endpoint)
    address = head.publish_endpoint

    def table_arrives(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            head.tables.force_next()
            head._housekeeping()
            if sub.poll(50):
                while sub.poll(0):
                    sub.recv_multipart()
                return True
        return False

    try:
        assert table_arrives(5.0)
        keyring.revoke(keys, "proxy", "bad")
        old = head._pub
        deadline = time.monotonic() + 5.0  # the registry notices within its rescan interval
        while head._pub is old:  # a housekeeping pass that sees the revocation closes the old publisher
            assert time.monotonic() < deadline, "the revocation was not noticed"
            head._housekeeping()
            sub.poll(50)
        assert table_arrives(5.0), "no table after the revocation"
        assert head.publish_endpoint == address and head._pub is not None
    finally:
        sub.close(0)
        head._control.close(0)
        if head._pub is not None:
            head._pub.close(0)
        head._auth.stop()
        ctx.term()
