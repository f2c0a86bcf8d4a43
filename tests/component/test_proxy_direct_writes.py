"""Direct writes (proxy/client_sink.py) through the Falcon app, with a real socket pair standing in for
gunicorn's client connection: tokens after the first go straight to the socket as HTTP/1.1 chunks, in
order, with the first and the final ones through the WSGI response; a client that reads slowly gets the
rest of a partly written chunk, then coalesced chunks; a client that is gone ends the stream and the
request is aborted at the replica; no token for `idle` seconds is still a 504 event even though the
request greenlet sleeps while tokens flow."""
from __future__ import annotations

import json
import socket
from typing import Any, Optional

import falcon.testing
import gevent
import gevent.socket
import pytest

from proxy.app import create_app
from proxy.client_sink import ClientSink
from proxy.config import ProxyConfig
from proxy.metrics import RequestTracker
from proxy.streams import RequestStream
from runtime.protocol import Delta
from tests.unit.test_proxy_app import FakeBackend, chat_body

CONFIG = dict(head="tcp://127.0.0.1:1", workers=1, first_token_timeout=2.0, idle_timeout=2.0,
              keepalive_interval=1.0)


def client(backend: FakeBackend, **config: Any) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(backend, ProxyConfig(**dict(CONFIG, **config))))


def parse_chunks(data: bytes) -> list[bytes]:
    """HTTP/1.1 chunked framing -> chunk payloads; fails on anything malformed."""
    out = []
    while data:
        size_line, sep, rest = data.partition(b"\r\n")
        assert sep, "truncated chunk header: %r" % data[:40]
        size = int(size_line, 16)
        assert size > 0, "a zero-size chunk would end the body"
        assert rest[size:size + 2] == b"\r\n", "bad chunk trailer"
        out.append(rest[:size])
        data = rest[size + 2:]
    return out


def contents(events: list[bytes]) -> list[str]:
    out = []
    for blob in events:
        for part in blob.decode().split("\n\n"):
            if part.startswith("data: {"):
                choice = json.loads(part[6:])["choices"]
                text = choice[0]["delta"].get("content", "") if choice else ""
                if text:  # the finish and usage events carry none
                    out.append(text)
    return out


def read_all(sock: socket.socket, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            got = sock.recv(1 << 16)
        except socket.timeout:
            return data
        if not got:
            return data
        data += got


def feed(backend: FakeBackend, texts: list[str], gap: float = 0.005, final: Optional[str] = "!") -> None:
    """Push deltas onto the request's stream from another greenlet, like the replica reader does."""
    def go() -> None:
        gevent.sleep(0.05)
        stream = backend.streams[-1]
        for i, text in enumerate(texts):
            stream.push(Delta(stream.request_id, text, None, 1, i + 2))
            gevent.sleep(gap)
        if final is not None:
            stream.push(Delta(stream.request_id, final, "stop", 1, len(texts) + 2))
    gevent.spawn(go)


def first_only(rid: str) -> list[Delta]:
    return [Delta(rid, "a", None, 1, 1)]


def test_tokens_after_the_first_go_straight_to_the_client_socket_in_order() -> None:
    backend = FakeBackend()
    backend.script = first_only
    mine, peer = socket.socketpair()
    middle = ["t%d " % i for i in range(40)]
    feed(backend, middle)
    r = client(backend).simulate_post("/v1/chat/completions", json=chat_body(stream=True),
                                      extras={"gunicorn.socket": mine})
    direct = parse_chunks(read_all(peer, 0.2))
    assert contents(direct) == middle  # every middle token, each its own chunk, in order
    through_wsgi = contents([r.content])
    assert through_wsgi == ["a", "!"]  # first (with the headers) and last (then the end of the body)
    assert r.text.endswith("data: [DONE]\n\n") and backend.aborted == []
    mine.close()
    peer.close()


def test_without_the_option_or_on_http_1_0_every_token_goes_through_wsgi() -> None:
    for config, protocol in (({"direct_writes": False}, "1.1"), ({}, "1.0")):
        backend = FakeBackend()
        backend.script = first_only
        mine, peer = socket.socketpair()
        feed(backend, ["x", "y"])
        r = client(backend, **config).simulate_post("/v1/chat/completions", json=chat_body(stream=True),
                                                    extras={"gunicorn.socket": mine}, http_version=protocol)
        assert read_all(peer, 0.1) == b""
        assert "".join(contents([r.content])) == "axy!"
        mine.close()
        peer.close()


def test_a_client_that_is_gone_ends_the_stream_and_aborts_at_the_replica() -> None:
    backend = FakeBackend()
    backend.script = first_only
    mine, peer = socket.socketpair()
    peer.close()  # the client hung up after the headers
    feed(backend, ["x%d" % i for i in range(200)], gap=0.002, final=None)  # the replica would go on
    r = client(backend).simulate_post("/v1/chat/completions", json=chat_body(stream=True),
                                      extras={"gunicorn.socket": mine})
    assert "[DONE]" not in r.text
    assert backend.aborted == ["wt-1"]
    mine.close()


def test_no_token_for_idle_seconds_is_still_a_504_event_while_tokens_went_direct() -> None:
    backend = FakeBackend()
    backend.script = first_only
    mine, peer = socket.socketpair()
    # tokens keep flowing for 1.5 idle timeouts (the request greenlet sleeps meanwhile), then stop
    feed(backend, ["k"] * 60, gap=0.025, final=None)
    r = client(backend, idle_timeout=1.0).simulate_post("/v1/chat/completions", json=chat_body(stream=True),
                                                        extras={"gunicorn.socket": mine})
    assert contents(parse_chunks(read_all(peer, 0.2))) == ["k"] * 60
    assert "no token from replica r1 for 1s" in r.text and "[DONE]" in r.text
    assert backend.aborted == ["wt-1"]
    mine.close()
    peer.close()


def test_a_slow_client_gets_the_rest_of_a_partial_chunk_then_coalesced_chunks() -> None:
    backend = FakeBackend()
    backend.script = first_only
    mine, peer = gevent.socket.socketpair()
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = ["%04d" % i + "x" * 1000 for i in range(60)]  # far more than the socket buffers hold
    feed(backend, big, gap=0.0)
    got: list[bytes] = []

    def slow_reader() -> None:
        gevent.sleep(0.3)  # let the buffers fill: the sink must give up mid-chunk
        while True:
            data = peer.recv(2048)
            if not data:
                return
            got.append(data)
            gevent.sleep(0.001)

    reader = gevent.spawn(slow_reader)
    r = client(backend).simulate_post("/v1/chat/completions", json=chat_body(stream=True),
                                      extras={"gunicorn.socket": mine})
    mine.shutdown(socket.SHUT_WR)
    reader.join(5)
    direct = contents(parse_chunks(b"".join(got)))  # whole chunks: the partial one was completed in order
    wsgi = contents([r.content])
    assert wsgi[0] == "a" and direct
    assert "".join(direct) + "".join(wsgi[1:]) == "".join(big) + "!"
    assert len(direct) + len(wsgi) < len(big)  # what queued behind the slow client went out coalesced
    mine.close()
    peer.close()


def test_sink_counts_tokens_and_never_writes_an_empty_chunk() -> None:
    mine, peer = socket.socketpair()
    tracker = RequestTracker("direct-test")
    tracker.token()  # the first token went out with the headers
    sink = ClientSink(mine, mine, (b"", str.encode, b""), tracker)
    stream = RequestStream("rq", "r1")
    stream.sink = sink
    assert stream.push(Delta("rq", "", None, 1, 1)) and stream.push(Delta("rq", "hi", None, 1, 2))
    assert parse_chunks(read_all(peer, 0.1)) == [b"hi"] and sink.chunks == 1
    assert not stream.queued and stream.sink is sink
    stream.push(Delta("rq", "end", "stop", 1, 3))  # terminal: queued for the request greenlet
    assert stream.sink is None and stream.queued and read_all(peer, 0.05) == b""
    mine.close()
    peer.close()


@pytest.mark.parametrize("http_version, expected", [("1.1", True), ("1.0", False)])
def test_for_environ_only_for_plain_http_1_1_gunicorn_sockets(http_version: str, expected: bool) -> None:
    mine, peer = socket.socketpair()
    env = {"gunicorn.socket": mine, "SERVER_PROTOCOL": "HTTP/" + http_version}
    tracker = RequestTracker("direct-test")
    template = (b"", str.encode, b"")
    assert (ClientSink.for_environ(env, template, tracker) is not None) is expected
    assert ClientSink.for_environ({"SERVER_PROTOCOL": "HTTP/1.1"}, template, tracker) is None
    mine.close()
    peer.close()


def test_plain_stream_whose_first_delta_is_empty_sends_headers_before_any_direct_write() -> None:
    """The legacy endpoint: an empty first delta still goes through the WSGI response (gunicorn sends the
    headers with the first part, even an empty one), so the sink's chunks come after the headers."""
    backend = FakeBackend()
    backend.script = lambda rid: [Delta(rid, "", None, 1, 1)]
    mine, peer = socket.socketpair()
    feed(backend, ["one ", "two "], final="three")
    app = create_app(backend, ProxyConfig(**CONFIG))
    environ = falcon.testing.create_environ(method="POST", path="/v1/chat/tiny", body="hi",
                                            headers={"Content-Type": "text/plain"})
    environ["gunicorn.socket"] = mine
    body = iter(app(environ, lambda status, headers: None))
    assert next(body) == b""  # the headers' write: nothing went to the socket before it
    assert read_all(peer, 0.05) == b""
    rest = list(body)
    assert parse_chunks(read_all(peer, 0.2)) == [b"one ", b"two "] and rest == [b"three"]
    mine.close()
    peer.close()


def test_a_partial_direct_write_is_completed_before_anything_else_reaches_the_socket() -> None:
    """The reader handles several TokenBatches in one go: after a delta the socket took only part of, the
    next one is queued. The request greenlet then got that item and returned it without sending the
    partial chunk's rest, so gunicorn wrote the next chunk into the middle of the partial one (and the
    sink was even re-attached with the rest still pending): the client's chunked body was garbage. Here
    the WSGI body goes to the same socket, in order, as gunicorn writes it."""
    backend = FakeBackend()
    backend.script = first_only
    mine, peer = gevent.socket.socketpair()
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = ["%04d" % i + "y" * 20000 for i in range(6)]

    def replica() -> None:  # two deltas back to back, as a reader draining two TokenBatches
        stream = backend.streams[-1]
        for i in range(0, len(big), 2):
            while stream.sink is None:  # the request greenlet parked with the sink attached
                gevent.sleep(0.001)
            stream.push(Delta(stream.request_id, big[i], None, 1, i + 2))  # the socket takes only part
            stream.push(Delta(stream.request_id, big[i + 1], None, 1, i + 3))  # queued behind it
        gevent.sleep(0.05)
        stream.push(Delta(stream.request_id, "!", "stop", 1, len(big) + 2))

    got: list[bytes] = []

    def client_reads() -> None:
        while True:
            data = peer.recv(1 << 16)
            if not data:
                return
            got.append(data)

    gevent.spawn_later(0.05, replica)
    reader = gevent.spawn_later(0.1, client_reads)
    app = create_app(backend, ProxyConfig(**CONFIG))
    environ = falcon.testing.create_environ("/v1/chat/completions", method="POST", body=json.dumps(
        chat_body(stream=True)), headers={"Content-Type": "application/json"}, http_version="1.1")
    environ["gunicorn.socket"] = mine
    body = app(environ, lambda status, headers, exc_info=None: None)
    try:
        for part in body:  # what gunicorn does with each piece of the WSGI body: one chunk on the socket
            if part:
                mine.sendall(b"%X\r\n%s\r\n" % (len(part), part))
    finally:
        body.close()
    mine.shutdown(socket.SHUT_WR)
    reader.join(5)
    assert "".join(contents(parse_chunks(b"".join(got)))) == "a" + "".join(big) + "!"
    mine.close()
    peer.close()


def test_a_flush_the_client_takes_nothing_of_raises_the_send_timeout() -> None:
    """The rest of a partial write is sent by the request greenlet under the socket's --send-timeout; a
    client that reads nothing must end as a stalled client (the worker counts it and closes), as a WSGI
    write would, not as a quiet "client gone" that leaves the connection to gunicorn."""
    mine, peer = gevent.socket.socketpair()
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    mine.settimeout(0.2)
    sink = ClientSink(mine, mine._sock, (b"", str.encode, b""), RequestTracker("tiny"))
    sink.unsent = b"z" * (1 << 22)  # far more than the socket buffers hold; the peer reads nothing
    with pytest.raises(TimeoutError):
        sink.flush()
    assert sink.unsent == b"" and sink.error is None
    mine.close()
    peer.close()
