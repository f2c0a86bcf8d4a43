"""A proxy worker's replica connections (proxy.replica_pool.ReplicaPool) against a replica-side CURVE
ROUTER with a real ZAP handler, in one gevent process (the replica's side on a plain context and a ZAP
thread, as in model_proc).

The operator's "proxy added later" steps (docs/operations.md): `keys add proxy edge2`, edge2 starts before
its public key reaches the agent host. The replica refuses it; libzmq never retries such a connection by
itself. Once the key is copied, the same worker must get through on its own (no restart, no reopening by
hand), and while refused the replica must not count as connected. Also pins what libzmq reports for the
NULL mechanism (a handshake event, like CURVE), which `connected` relies on in insecure mode."""
from __future__ import annotations

import logging
import shutil
import time

import gevent
import pytest
import zmq
import zmq.green as zmq_green

from proxy.handshake import REOPEN_MAX_S
from proxy.replica_pool import ReplicaPool
from proxy.replicas import ReplicaConnection
from proxy.streams import RequestStream
from runtime import authz, curve, keyring
from runtime.keyring import Registry
from runtime.protocol import (
    KEY_REFUSED, Delta, DeploymentRoute, GenerateRequest, ReplicaRoute, RequestError, RoutingTable, TokenBatch,
    decode_frames, encode,
)
from runtime.zap import ZapHandler


def _until(condition, bound: float, what: str) -> None:
    """Poll `condition` (letting the worker's greenlets run) until it holds; fail after `bound` seconds."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("not within %.0fs: %s" % (bound, what))
        gevent.sleep(0.02)


@pytest.fixture
def keys(tmp_path):
    """(head host's key dir, agent host's key dir as copied before edge2 was added, edge2's key dir)."""
    head = tmp_path / "head"
    keyring.init_cluster(head)
    agent = tmp_path / "agent-host"
    shutil.copytree(head, agent)
    edge2 = tmp_path / "edge2"
    keyring.add(head, "proxy", "edge2", out=edge2)
    return head, agent, edge2


@pytest.fixture
def replica(keys):
    """The agent host's replica: (green view of its CURVE data ROUTER, refusals its ZAP handler made)."""
    _head, agent, _edge2 = keys
    ctx = zmq.Context()
    refusals: list[tuple[str, str, str]] = []
    zap = ZapHandler(ctx, Registry(agent), lambda *a: refusals.append(a)).start()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as model_proc's
    curve.serve(router, keyring.server_pair(agent, "replica"), authz.REPLICA_DATA)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    green = zmq_green.Socket.shadow(router.underlying)  # read it without blocking the worker's greenlets
    yield green, "tcp://127.0.0.1:%d" % port, refusals
    green.close(linger=0)  # first: closes the socket too, and stops the green watcher on its FD (a watcher
    router.close(0)  # left on a closed FD that a later test reuses aborted the whole pytest process in libev)
    zap.stop()
    ctx.term()


def _table(endpoint: str) -> RoutingTable:
    return RoutingTable(1, 1, 0.0, [DeploymentRoute("dep", "mock", "m", [ReplicaRoute("r1", endpoint, 0, 0, 0.0, 8)])])


def test_a_proxy_key_copied_to_the_replica_host_later_is_picked_up_without_a_restart(keys, replica, caplog):
    head, agent, edge2 = keys
    router, endpoint, refusals = replica
    ctx = zmq_green.Context()
    woken_with: list[bool] = []  # `connected` of r1 each time queued requests were told to retry
    secure = curve.client(keyring.identity(edge2, "proxy"), keyring.server_public(edge2, "replica"))
    pool = ReplicaPool(ctx, b"proxy-edge2-w1", 100, secure=secure,
                       on_capacity=lambda d: woken_with.extend(c.connected for c in pool.connections(d)))
    caplog.set_level(logging.INFO, logger="proxy.replicas")
    try:
        pool.sync(_table(endpoint))
        conn = pool.get("r1")
        early = RequestStream("early", "r1")
        conn.submit(early, GenerateRequest("early", prompt="hi"))  # queued before the handshake fails

        _until(lambda: len(refusals) >= 3, 10, "the replica refused edge2's key three times (two reopens)")
        failed = early.get(5.0)  # not left hanging on a connection that will never come up
        assert isinstance(failed, RequestError) and failed.status == 503 and early.lost, failed
        assert not conn.connected and conn.down and pool.reachable() == 0
        assert True not in woken_with  # a refused replica was never counted as connected
        warnings = [r for r in caplog.records if "refused this proxy's key" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING, warnings  # once, not per retry
        assert "r1" in warnings[0].getMessage() and "retrying" in warnings[0].getMessage()

        shutil.copy(head / "registry" / "proxy-edge2.key", agent / "registry" / "proxy-edge2.key")
        _until(lambda: pool.reachable() == 1, REOPEN_MAX_S + 5, "edge2 connected once its key was copied")
        assert pool.get("r1") is conn and conn.connected and not conn.down

        later = RequestStream("later", "r1")
        conn.submit(later, GenerateRequest("later", prompt="hi"))
        with gevent.Timeout(5):
            peer, *frames = router.recv_multipart()
        assert decode_frames(frames).request_id == "later"
        assert peer != b"proxy-edge2-w1"  # a new DEALER, with a new identity
        router.send_multipart([peer] + encode(TokenBatch([Delta("later", "ok", "stop", 1, 1)])))
        item = later.get(5.0)
        assert isinstance(item, Delta) and item.text == "ok", item
        assert any("accepted this proxy after" in r.getMessage() for r in caplog.records)
    finally:
        pool.close_all()
        ctx.term()


def test_a_plain_connection_counts_as_connected_after_its_handshake():
    """Insecure mode (no CURVE): libzmq reports HANDSHAKE_SUCCEEDED for the NULL mechanism too."""
    ctx = zmq_green.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    conn = ReplicaConnection(ctx, b"w1", "dep", ReplicaRoute("r1", "tcp://127.0.0.1:%d" % port, 0, 0, 0.0, 8), 100)
    try:
        _until(lambda: conn.connected, 5, "a plain connection counted as connected")
        assert not conn.down
    finally:
        conn.close("test over")
        router.close(0)
        ctx.term()


def test_a_key_revoked_on_an_open_connection_makes_the_replica_unreachable_until_accepted_again(keys, replica):
    """The replica refuses a request with KEY_REFUSED on a connection it accepted before the key was
    revoked. /ready counted it as reachable (200 while every request got 503); now the proxy reconnects at
    once, the replica's ZAP refuses the new handshake, and the replica stays unreachable with no client
    request needed, until the key is accepted again."""
    head, agent, edge2 = keys
    router, endpoint, refusals = replica
    registered = agent / "registry" / "proxy-edge2.key"
    shutil.copy(head / "registry" / "proxy-edge2.key", registered)
    ctx = zmq_green.Context()
    secure = curve.client(keyring.identity(edge2, "proxy"), keyring.server_public(edge2, "replica"))
    pool = ReplicaPool(ctx, b"proxy-edge2-w1", 100, secure=secure)
    try:
        pool.sync(_table(endpoint))
        conn = pool.get("r1")
        _until(lambda: pool.reachable() == 1, 10, "connected with an accepted key")

        registered.unlink()  # revoked on the replica's host; the open connection stays up
        stream = RequestStream("a", "r1")
        conn.submit(stream, GenerateRequest("a", prompt="hi"))
        with gevent.Timeout(5):
            peer, *_frames = router.recv_multipart()
        router.send_multipart([peer] + encode(RequestError("a", 403, "key not accepted", KEY_REFUSED)))
        refused = stream.get(5.0)
        assert isinstance(refused, RequestError) and refused.type == KEY_REFUSED
        assert pool.reachable() == 0  # at once, not after the next client request
        _until(lambda: len(refusals) >= 1 and conn.down, 10, "the new handshake refused by the replica's ZAP")
        assert pool.reachable() == 0

        shutil.copy(head / "registry" / "proxy-edge2.key", registered)
        _until(lambda: pool.reachable() == 1, REOPEN_MAX_S + 5, "reachable again once the key is accepted")
        assert not conn.key_refused
    finally:
        pool.close_all()
        ctx.term()


def test_a_curve_client_against_a_plain_socket_is_not_connected_and_says_why(keys, caplog):
    """A protocol error (CURVE on one side only) also ends libzmq's connection for good: reported once,
    retried with new connections, never counted as connected."""
    _head, _agent, edge2 = keys
    ctx = zmq_green.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    secure = curve.client(keyring.identity(edge2, "proxy"), keyring.server_public(edge2, "replica"))
    conn = ReplicaConnection(ctx, b"w1", "dep", ReplicaRoute("r1", "tcp://127.0.0.1:%d" % port, 0, 0, 0.0, 8),
                             100, secure=secure)
    caplog.set_level(logging.DEBUG, logger="proxy.replicas")
    try:
        _until(lambda: sum("reopened the connection" in r.getMessage() for r in caplog.records) >= 2, 10,
               "two new connections after protocol errors")
        assert not conn.connected and conn.down
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "protocol error" in warnings[0].getMessage(), warnings
    finally:
        conn.close("test over")
        router.close(0)
        ctx.term()
