"""proxy.request_body.read_body's bounds on time, with a fake clock and fake bodies (no sockets).

The pace (--body-min-rate): a body may take --body-timeout + its bytes / the rate in all. A client that
keeps sending just inside each pause used to hold its connection and its greenlet forever.
"""
from __future__ import annotations

import io
from typing import Any

import falcon
import falcon.testing
import gevent
import pytest

from proxy.errors import BodyTimeout, BodyTooLarge
from proxy.gunicorn_hooks import CONTINUE_ENV, LINGER_ENV
from proxy.request_body import READ_CHUNK, read_body


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PacedInput:
    """A body of `size` bytes that arrives at `rate` bytes/s: each read advances the fake clock by the
    time the bytes it returns took to come."""

    def __init__(self, clock: FakeClock, size: int, rate: float) -> None:
        self.clock = clock
        self.left = size
        self.rate = rate

    def read(self, size: int = -1) -> bytes:
        n = min(self.left, READ_CHUNK if size < 0 else size)
        self.left -= n
        self.clock.now += n / self.rate
        return b"x" * n


def request(body: Any, length: int, **env: Any) -> falcon.Request:
    environ = falcon.testing.create_environ(method="POST", path="/v1/completions",
                                           headers={"Content-Length": str(length)})
    environ["wsgi.input"] = body
    environ.update(env)
    return falcon.Request(environ)


def test_a_body_at_the_minimum_rate_is_read_whole() -> None:
    """A 2 MiB prompt at exactly 4 KiB/s (512 s, far past the 30 s grace) is a slow link, not an attack."""
    clock = FakeClock()
    size = 2 << 20
    req = request(PacedInput(clock, size, 4096), size)
    assert len(read_body(req, 16 << 20, 30.0, 4096, clock)) == size
    assert clock.now - 1000.0 == pytest.approx(512.0)
    assert LINGER_ENV not in req.env


def test_a_body_under_the_minimum_rate_is_cut_off_once_behind_by_more_than_the_grace() -> None:
    """At 90% of the rate a 2 MiB body falls 30 s behind after about 270 s (1.1 MiB): it is a 408 then,
    not after the 512+ s the whole upload would take, and the connection closes."""
    clock = FakeClock()
    size = 2 << 20
    req = request(PacedInput(clock, size, 0.9 * 4096), size)
    with pytest.raises(BodyTimeout) as caught:
        read_body(req, 16 << 20, 30.0, 4096, clock)
    assert caught.value.status == 408 and caught.value.code == "request_timeout"
    assert caught.value.message.startswith("request body too slow: it must average 4096 bytes/s after the "
                                           "first 30s (")
    assert 250 < clock.now - 1000.0 < 320
    assert req.env[LINGER_ENV] is True


def test_without_a_minimum_rate_only_pauses_count() -> None:
    clock = FakeClock()
    req = request(PacedInput(clock, 1 << 20, 100), 1 << 20)
    assert len(read_body(req, 16 << 20, 30.0, 0, clock)) == 1 << 20  # 10,486 s: each read within its pause


class TricklingInput:
    """A client that sends one byte every `gap` seconds (real time), never pausing as long as the
    pause bound."""

    def __init__(self, gap: float) -> None:
        self.gap = gap
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        gevent.sleep(self.gap)
        self.reads += 1
        return b" "


def test_a_trickle_inside_every_pause_is_a_408_at_the_pace_deadline() -> None:
    """One byte every 20 ms never trips the 100 ms pause; a 1,000-byte body at 10,000 bytes/s may take
    0.1 + 0.1 s in all, so the trickle ends there (real timers: the read in progress is interrupted)."""
    body = TricklingInput(0.02)
    req = request(body, 1000)
    with pytest.raises(BodyTimeout) as caught:
        read_body(req, 16 << 20, 0.1, 10_000)
    assert caught.value.message.startswith("request body too slow")
    assert 5 <= body.reads <= 15  # cut off at about 0.2 s, not after the 20 s the trickle would take
    assert req.env[LINGER_ENV] is True


def test_a_stall_is_still_named_a_stall() -> None:
    req = request(TricklingInput(5.0), 1000)
    with pytest.raises(BodyTimeout) as caught:
        read_body(req, 16 << 20, 0.05, 10)
    assert caught.value.message == "request body stalled: no data for 0.05s"


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)


def test_the_owed_100_continue_goes_out_when_the_body_is_read_and_only_then() -> None:
    sock = FakeSocket()
    req = request(io.BytesIO(b"{}"), 2, **{"gunicorn.socket": sock, CONTINUE_ENV: True})
    assert read_body(req, 100, 1.0) == b"{}"
    assert sock.sent == [b"HTTP/1.1 100 Continue\r\n\r\n"] and req.env[CONTINUE_ENV] == "sent"

    sock = FakeSocket()
    req = request(io.BytesIO(b"x" * 200), 200, **{"gunicorn.socket": sock, CONTINUE_ENV: True})
    with pytest.raises(BodyTooLarge):  # refused before the body is asked for
        read_body(req, 100, 1.0)
    assert sock.sent == [] and req.env[CONTINUE_ENV] is True


class TinyChunks:
    """A chunked body of 1-byte chunks already in the socket buffer: gunicorn decodes it at about
    1.75 us per byte, all of one read without a yield."""

    def __init__(self, clock: FakeClock, size: int) -> None:
        self.clock = clock
        self.left = size
        self.reads: list[int] = []

    def read(self, size: int = -1) -> bytes:
        n = min(self.left, size)
        self.left -= n
        self.clock.now += n * 1.75e-6
        self.reads.append(n)
        return b" " * n


def test_a_chunked_body_of_tiny_chunks_is_read_in_pieces_of_about_5_ms() -> None:
    """Read 64 KiB at a time, 1-byte chunks held the worker 0.11 s per read (2,000,000 of them: every
    stream of the worker stalled 3.4 s); pieces sized to the decoding speed keep each read near 5 ms."""
    clock = FakeClock()
    body = TinyChunks(clock, 1 << 20)
    environ = falcon.testing.create_environ(method="POST", path="/v1/completions",
                                           headers={"Transfer-Encoding": "chunked"})
    environ["wsgi.input"] = body
    assert len(read_body(falcon.Request(environ), 16 << 20, 30.0, 4096, clock)) == 1 << 20
    assert max(body.reads) * 1.75e-6 < 0.006
    assert len(body.reads) < 500  # not byte by byte either: about 2,857 bytes a read


def test_a_chunked_body_of_large_chunks_keeps_64_kib_reads() -> None:
    clock = FakeClock()
    body = PacedInput(clock, 4 << 20, 500e6)
    environ = falcon.testing.create_environ(method="POST", path="/v1/completions",
                                           headers={"Transfer-Encoding": "chunked"})
    environ["wsgi.input"] = body
    reads: list[int] = []
    real_read = body.read
    body.read = lambda size=-1: reads.append(size) or real_read(size)  # type: ignore[method-assign]
    assert len(read_body(falcon.Request(environ), 16 << 20, 30.0, 4096, clock)) == 4 << 20
    assert reads[0] == 1024 and reads[2:-1] == [READ_CHUNK] * len(reads[2:-1])


@pytest.mark.parametrize("size, turns", [(100, 0), (READ_CHUNK, 0), (3 * READ_CHUNK + 5, 3)])
def test_a_body_gives_the_worker_a_turn_between_its_pieces_but_none_once_it_is_complete(
        monkeypatch: pytest.MonkeyPatch, size: int, turns: int) -> None:
    """Under load the loop last polled long ago, so a turn is a wait behind every ready stream: a body
    that is all there (every small prompt) must not pay it before its own request is parsed."""
    from proxy import request_body

    taken: list[int] = []
    monkeypatch.setattr(request_body.TURNS, "take", lambda: taken.append(1))
    clock = FakeClock()
    assert len(read_body(request(PacedInput(clock, size, 1e9), size), 1 << 24, 30.0, clock=clock)) == size
    assert len(taken) == turns
