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
from proxy.replicas import KEY_REFUSED_HOLD_S, ReplicaConnection
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
    router.close(0)
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


def test_a_replica_that_refuses_this_proxys_key_is_not_reachable_until_it_answers_again():
    """A key revoked (or not on the replica's host) while the connection stays open: the replica refuses
    each request with KEY_REFUSED. /ready must not count it (it said 200 while every request got 503) for
    KEY_REFUSED_HOLD_S; a token from it, or the hold running out, counts it again."""
    now = [0.0]
    ctx = zmq_green.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    conn = ReplicaConnection(ctx, b"w1", "dep", ReplicaRoute("r1", "tcp://127.0.0.1:%d" % port, 0, 0, 0.0, 8), 100,
                             clock=lambda: now[0])

    def answer(request_id: str, msg: object) -> object:
        stream = RequestStream(request_id, "r1")
        conn.submit(stream, GenerateRequest(request_id, prompt="hi"))
        with gevent.Timeout(5):
            peer, *_frames = router.recv_multipart()
        router.send_multipart([peer] + encode(msg))
        return stream.get(5.0)

    try:
        _until(lambda: conn.connected, 5, "a plain connection counted as connected")
        assert conn.reachable
        refused = answer("a", RequestError("a", 403, "key not accepted", KEY_REFUSED))
        assert isinstance(refused, RequestError) and refused.type == KEY_REFUSED
        assert conn.connected and not conn.reachable
        now[0] = KEY_REFUSED_HOLD_S - 1
        assert not conn.reachable
        now[0] = KEY_REFUSED_HOLD_S + 1  # nobody sent it a request since: count it again, to be tried
        assert conn.reachable
        answer("b", RequestError("b", 403, "key not accepted", KEY_REFUSED))
        assert not conn.reachable
        token = answer("c", TokenBatch([Delta("c", "ok", "stop", 1, 1)]))
        assert isinstance(token, Delta) and conn.reachable  # it takes this proxy again
    finally:
        conn.close("test over")
        router.close(0)
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
