"""What a replica connection makes of its handshake events (proxy.handshake.Handshakes; no sockets): when
it reopens the connection, how long it waits, and when the operator is told."""
from __future__ import annotations

import zmq

from proxy.handshake import DROPPED, PROTOCOL, REFUSED, Handshakes

AUTH = zmq.EVENT_HANDSHAKE_FAILED_AUTH
PROTO = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
NO_DETAIL = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def test_a_refused_key_is_reported_once_per_streak_and_retried_with_a_growing_wait():
    h = Handshakes(initial=0.5, maximum=5.0)
    failures = [h.failed(AUTH, 400) for _ in range(6)]
    assert [f.kind for f in failures] == [REFUSED] * 6
    assert [f.warn for f in failures] == [True] + [False] * 5
    assert [f.reopen_in for f in failures] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert "ZAP status 400" in failures[0].reason and "registry/proxy-NAME.key" in failures[0].reason
    assert h.succeeded() == 6
    again = h.failed(AUTH, 400)  # a new streak (the key was revoked later): told again, quick retry
    assert again.warn and again.reopen_in == 0.5


def test_a_new_kind_of_failure_within_a_streak_is_reported():
    h = Handshakes()
    assert h.failed(AUTH, 400).warn
    proto = h.failed(PROTO, 0x11000001)
    assert proto.kind == PROTOCOL and proto.warn and "0x11000001" in proto.reason


def test_a_dropped_handshake_is_left_to_libzmqs_own_reconnect():
    h = Handshakes()
    first, second = h.failed(NO_DETAIL, 104), h.failed(NO_DETAIL, 104)
    assert first.kind == DROPPED and first.reopen_in is None and second.reopen_in is None
    assert first.warn and not second.warn
    assert "replica.key" in first.reason
