"""A proxy worker's replica connection (proxy.replicas.ReplicaConnection) against a fake replica ROUTER,
real ZeroMQ sockets in one gevent process: a burst of TokenBatches larger than one drain reaches the
request streams whole and in order, and a reply that arrives while request greenlets are sending on the
same socket (the sends can consume the socket's edge-triggered FD signal) still wakes the reader at
once (the reader has no periodic poll to fall back on: a lost wake-up would leave it asleep); a message
that breaks the reader fails only the requests in flight, and reading goes on."""
from __future__ import annotations

import time

import gevent
import pytest
import zmq
import zmq.green as zmq_green

import proxy.replicas
from proxy.raw_dealer import DRAIN_BATCH
from proxy.replicas import ReplicaConnection
from proxy.streams import RequestStream
from runtime.protocol import (
    Delta, GenerateRequest, ReplicaRoute, RequestError, TokenBatch, decode_frames, encode,
)


@pytest.fixture
def replica():
    """(fake replica ROUTER, a connected ReplicaConnection), both on one zmq.green context (the
    connection's DEALER is a plain socket on it, its monitor a green one)."""
    ctx = zmq_green.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    route = ReplicaRoute("r1", "tcp://127.0.0.1:%d" % port, 0, 0, 0.0, 100)
    conn = ReplicaConnection(ctx, b"worker-1", "dep", route, hwm=100000)
    yield router, conn
    conn.close("test over")
    router.close(0)
    ctx.term()


def _stream(conn: ReplicaConnection, request_id: str) -> RequestStream:
    stream = RequestStream(request_id, "r1")
    conn.submit(stream, GenerateRequest(request_id, prompt="hi"))
    return stream


def _recv_request(router) -> tuple[bytes, GenerateRequest]:
    with gevent.Timeout(5):
        peer, *frames = router.recv_multipart()
    return peer, decode_frames(frames)


def test_a_burst_longer_than_one_drain_arrives_whole_and_in_order(replica):
    router, conn = replica
    streams = [_stream(conn, "req-%d" % i) for i in range(3)]
    peer = None
    for _ in streams:
        peer, _req = _recv_request(router)
    batches = 2 * DRAIN_BATCH + 17
    for n in range(batches):
        finish = "length" if n == batches - 1 else None
        deltas = [Delta(s.request_id, "t%d " % n, finish, 1, n + 1) for s in streams]
        router.send_multipart([peer] + encode(TokenBatch(deltas, load=3)))
    for stream in streams:
        texts = []
        with gevent.Timeout(10):
            while True:
                item = stream.get(5.0)
                assert isinstance(item, Delta), item
                texts.append(item.text)
                if item.finish_reason is not None:
                    break
        assert texts == ["t%d " % n for n in range(batches)]


def test_replies_racing_sends_on_the_same_socket_wake_the_reader(replica):
    router, conn = replica
    waits = []
    for i in range(200):
        stream = _stream(conn, "ping-%d" % i)
        peer, req = _recv_request(router)
        router.send_multipart([peer] + encode(TokenBatch([Delta(req.request_id, "pong", "stop", 1, 1)])))
        # Hold the OS thread (no greenlet switch) until the reply has reached the DEALER's mailbox, then
        # send: libzmq processes the pending "message arrived" command inside that send, which resets
        # the FD the reader's wait is on. Provokes the hazard; it is not waiting for a result.
        time.sleep(0.005)
        _stream(conn, "other-%d" % i)
        t0 = gevent.get_hub().loop.now()
        item = stream.get(3.0)  # a missed wakeup fails here: nothing else would wake the reader
        waits.append(gevent.get_hub().loop.now() - t0)
        assert isinstance(item, Delta) and item.text == "pong", (i, item)
        _recv_request(router)  # the "other" request
    assert max(waits) < 1.0


def test_a_message_that_breaks_the_reader_fails_its_requests_and_reading_goes_on(replica, monkeypatch):
    router, conn = replica
    victim = _stream(conn, "victim")
    peer, _req = _recv_request(router)
    real_decode = proxy.replicas.decode_frames
    calls = []

    def decode_with_a_bug(frames):  # looked up per message, so the running reader picks it up
        calls.append(frames)
        if len(calls) == 1:
            raise RuntimeError("bug while handling a message")
        return real_decode(frames)

    monkeypatch.setattr(proxy.replicas, "decode_frames", decode_with_a_bug)
    router.send_multipart([peer] + encode(TokenBatch([Delta("victim", "lost", None, 1, 1)])))
    failed = victim.get(5.0)
    assert isinstance(failed, RequestError) and failed.status == 503, failed
    later = _stream(conn, "later")  # the same connection still serves new requests
    peer, req = _recv_request(router)
    router.send_multipart([peer] + encode(TokenBatch([Delta(req.request_id, "fine", "stop", 1, 1)])))
    item = later.get(5.0)
    assert isinstance(item, Delta) and item.text == "fine", item
    assert not conn.down
