"""Contract tests for the library internals tokenrelay's fast paths rely on, and for the pins that hold them.

Each fast path lives in one class whose docstring states its invariant; this file fails first when an
upgrade of the pinned library changes what that class relies on:

  library            relied on                                        by
  -----------------  -----------------------------------------------  ----------------------------------
  pyzmq              zmq.backend.Socket.recv/send/get (libzmq calls   proxy/replicas.py ReplicaConnection
                     without pyzmq's Python wrappers), int EVENTS
  gevent             a gevent socket's `_sock`: the stdlib socket     proxy/client_sink.py ClientSink,
                     it wraps                                         proxy/middleware.py client_probe
  gunicorn           environ["gunicorn.socket"]: the client socket    proxy/client_sink.py ClientSink
                     util.write_error(sock, status, reason, mesg),    proxy/gunicorn_hooks.py
                     called as util.write_error by handle_error       install_json_errors
                     the request head read inside timeout_ctx();      proxy/gunicorn_worker.py
                     "100 Continue" sent by wsgi.create iff           ProxyGeventWorker (--header-timeout,
                     req._expected_100_continue; start_response a     the owed 100 Continue, an honest
                     bound method of the Response (force_close)       Connection: close)
  prometheus-client  a histogram child's `_upper_bounds`, `_buckets`  proxy/metrics.py BatchedObservations
                     (per-bucket, non-cumulative) and `_sum`
"""
from __future__ import annotations

import _socket
import inspect
from types import SimpleNamespace
from importlib import metadata

import pytest
from packaging.requirements import Requirement

PINNED = ("pyzmq", "gevent", "gunicorn", "prometheus-client", "msgspec")


def _declared() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in metadata.requires("tokenrelay") or []]
    return {r.name.lower(): r for r in reqs if r.marker is None}


@pytest.mark.parametrize("name", PINNED)
def test_the_installed_version_is_the_pinned_minor(name: str) -> None:
    req = _declared()[name]
    spec = str(req.specifier)
    assert "<" in spec and ">=" in spec, "%s must be pinned to a tested range, not %r" % (name, spec)
    installed = metadata.version(name)
    assert req.specifier.contains(installed), "%s %s is outside the tested pin %s" % (name, installed, spec)


def test_pyzmq_backend_socket_calls_exist_and_events_is_an_int() -> None:
    import zmq

    for call in ("recv", "send", "get"):
        assert callable(getattr(zmq.backend.Socket, call)), call
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        events = zmq.backend.Socket.get(sock, int(zmq.EVENTS))
        assert isinstance(events, int) and not events & int(zmq.POLLIN)  # nothing queued on a new socket
        fd = zmq.backend.Socket.get(sock, int(zmq.FD))
        assert isinstance(fd, int) and fd >= 0
        sock.close(linger=0)
    finally:
        ctx.term()


def test_gevent_socket_wraps_a_stdlib_socket_as_sock() -> None:
    import gevent.socket

    s = gevent.socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        assert isinstance(s._sock, _socket.socket)  # the C base that ClientSink checks for
        assert s._sock.fileno() == s.fileno()
    finally:
        s.close()


def test_gunicorn_puts_the_client_socket_in_the_environ() -> None:
    from gunicorn.config import Config
    from gunicorn.http import wsgi

    assert list(inspect.signature(wsgi.create).parameters)[:2] == ["req", "sock"]
    sock = object()
    req = SimpleNamespace(body=b"", method="GET", query="", uri="/", version=(1, 1))
    environ = wsgi.default_environ(req, sock, Config())
    assert environ["gunicorn.socket"] is sock and environ["SERVER_PROTOCOL"] == "HTTP/1.1"


def test_prometheus_histogram_child_layout() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    h = Histogram("contract_seconds", "x", ["l"], buckets=(0.1, 1.0), registry=CollectorRegistry())
    child = h.labels("a")
    assert list(child._upper_bounds) == [0.1, 1.0, float("inf")]
    assert len(child._buckets) == 3 and all(hasattr(b, "inc") and hasattr(b, "get") for b in child._buckets)
    child.observe(0.5)
    assert [b.get() for b in child._buckets] == [0, 1, 0]  # per bucket, not cumulative
    assert child._sum.get() == 0.5


def test_gunicorn_writes_its_own_errors_through_util_write_error() -> None:
    from gunicorn import util
    from gunicorn.workers import base

    assert list(inspect.signature(util.write_error).parameters) == ["sock", "status_int", "reason", "mesg"]
    source = inspect.getsource(base.Worker.handle_error)
    assert "util.write_error(client, status_int, reason, mesg)" in source


def test_gunicorn_reads_each_request_head_inside_timeout_ctx() -> None:
    from gunicorn.workers import base_async

    source = inspect.getsource(base_async.AsyncWorker.handle)
    assert "with self.timeout_ctx():\n                            req = next(parser)" in source


def test_gunicorn_sends_100_continue_from_wsgi_create_only_when_the_request_expects_it() -> None:
    from gunicorn.config import Config
    from gunicorn.http import wsgi

    class Sock:
        sent: list[bytes] = []

        def send(self, data: bytes) -> int:
            self.sent.append(data)
            return len(data)

    for expected in (True, False):
        sock = Sock()
        sock.sent = []
        req = SimpleNamespace(body=b"", method="POST", query="", uri="/", path="/", version=(1, 1), headers=[],
                              scheme="http", proxy_protocol_info=None, _expected_100_continue=expected)
        resp, environ = wsgi.create(req, sock, ("127.0.0.1", 1), ("127.0.0.1", 2), Config())
        assert sock.sent == ([b"HTTP/1.1 100 Continue\r\n\r\n"] if expected else [])
        start_response = resp.start_response
        assert start_response.__self__ is resp and callable(resp.force_close)
        resp.force_close()
        assert resp.should_close()
