"""Reading and checking a request's body: size, pace, framing, media type, JSON depth.

Runs in proxy workers on the request's greenlet; owns no socket (it reads the WSGI input gunicorn gives
the request). Every failure is a ProxyError the app turns into an OpenAI error body; one that leaves the
rest of the body unread also marks the request so the server hook closes the connection after the
answer (proxy/gunicorn_hooks.py, LINGER_ENV) instead of draining it through the worker.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import falcon
import gevent
from gunicorn.http.errors import NoMoreData, ParseException

from proxy.errors import BodyTimeout, BodyTooLarge, ClientGone, InvalidRequest, UnsupportedMediaType
from proxy.gunicorn_hooks import CONTINUE_ENV, LINGER_ENV
from proxy.loop_turns import TURNS

READ_CHUNK = 65536  # bytes per read of a request body; the worker's other greenlets run in between
PIECE_SECONDS = 0.005  # a chunked body's reads are sized to take about this long (below)
MIN_PIECE = 1024


def read_body(req: falcon.Request, limit: int, timeout: float, min_rate: int = 0,
              clock: Callable[[], float] = time.monotonic) -> bytes:
    """The request body, at most `limit` bytes, else 413 (at once when Content-Length says so, before
    reading anything). Chunked bodies (no Content-Length) are read to their end within the same limit.
    Read in 64 KiB pieces (a chunked body's sized to ~5 ms of decoding: _next_piece) with a turn for
    the worker's other greenlets between them (proxy/loop_turns.py): gevent's recv does not yield
    while data is there, so one fast upload would otherwise hold the worker (and every stream on it)
    until it ends. Bad chunked framing is a 400 (gunicorn raises it from read(): it was a 500 with a
    traceback).

    Two bounds on time, each a 408 that closes the connection:
      * a pause: no byte for `timeout` seconds. Under gunicorn that is the client socket's timeout,
        which every receive restarts (one 64 KiB read may take many); elsewhere (no `gunicorn.socket`)
        a timer per read. gunicorn itself bounds only the wait for a request's headers.
      * a pace (with `min_rate` > 0): the body may take `timeout` + bytes / `min_rate` seconds in all,
        as Apache's mod_reqtimeout (body=20,MinRate=500) and Kestrel's MinRequestBodyDataRate do. The
        bytes are counted per piece, the piece being read credited in advance, so a client at
        `min_rate` always passes and one that trickles a byte just inside each pause is cut off after
        at most `timeout` + 64 KiB / `min_rate` seconds (it held its connection and greenlet forever).
    An Expect: 100-continue request gets its "100 Continue" here, when the body is wanted (CONTINUE_ENV,
    set by proxy/gunicorn_worker.py): one refused before (401, 404, 413) is answered without its body."""
    chunked = req.content_length is None and "chunked" in (req.get_header("Transfer-Encoding") or "").lower()
    if req.content_length is not None and req.content_length > limit:
        raise BodyTooLarge("request body exceeds %d bytes" % limit)
    stream = req.stream if chunked else req.bounded_stream
    sock: Any = req.env.get("gunicorn.socket")
    if req.env.get(CONTINUE_ENV) is True:
        req.env[CONTINUE_ENV] = "sent"
        _send_continue(req, sock)
    per_receive = callable(getattr(sock, "settimeout", None))
    previous = sock.gettimeout() if per_receive else None
    if per_receive:
        sock.settimeout(timeout)
    pace = _Pace(clock, timeout, min_rate, req.content_length)
    parts: list[bytes] = []
    size = 0
    piece = MIN_PIECE if chunked else READ_CHUNK
    try:
        while size <= limit:
            want = min(piece, limit + 1 - size)
            began = clock()
            left = pace.seconds_left(size, want)
            pause = None if per_receive else timeout
            slow = left is not None and (pause is None or left < pause)
            data = _read(req, stream, want, left if slow else pause, timeout,
                         pace.too_slow if slow else None)
            if not data:
                break
            parts.append(data)
            size += len(data)
            if chunked:
                piece = _next_piece(len(data), clock() - began)
            if (left := pace.seconds_left(size, 0)) is not None and left < 0:  # this piece came too late
                req.env[LINGER_ENV] = True
                raise BodyTimeout(pace.too_slow())
            if req.content_length is not None and size >= req.content_length:
                break  # all there: no turn to give (every request would wait a loop round for its own parse)
            TURNS.take()
    finally:
        if per_receive:
            sock.settimeout(previous)  # a keep-alive connection's next request waits as gunicorn says
    if size > limit:
        raise BodyTooLarge("request body exceeds %d bytes" % limit)
    req.context.body_read = True
    return b"".join(parts)


def _next_piece(got: int, seconds: float) -> int:
    """The size of a chunked body's next read: what the last one decoded in PIECE_SECONDS. gunicorn
    parses chunk framing in Python, about 1.75 us per chunk: a body of 1-byte chunks took 0.11 s per
    64 KiB read, all that time without a yield (200,000 of them held the worker's streams 0.35 s).
    Large chunks keep 64 KiB reads (smaller ones would copy gunicorn's read-ahead buffer more often)."""
    return int(min(READ_CHUNK, max(MIN_PIECE, got / max(seconds, 1e-6) * PIECE_SECONDS)))


class _Pace:
    """The deadline of a body that must average `min_rate` bytes/s after a grace of `grace` seconds."""

    def __init__(self, clock: Callable[[], float], grace: float, min_rate: int, length: Optional[int]) -> None:
        self.clock = clock
        self.started = clock()
        self.grace = grace
        self.min_rate = min_rate
        self.length = length

    def seconds_left(self, size: int, want: int) -> Optional[float]:
        """Time left to read the next piece (`want` bytes after `size`), or None when unbounded."""
        if not self.min_rate:
            return None
        if self.length is not None:
            if size >= self.length:
                return None  # all there: the last read only sees the end
            want = min(want, self.length - size)
        return self.started + self.grace + (size + want) / self.min_rate - self.clock()

    def too_slow(self) -> str:
        return ("request body too slow: it must average %d bytes/s after the first %gs (%.1fs so far)"
                % (self.min_rate, self.grace, self.clock() - self.started))


def _send_continue(req: falcon.Request, sock: Any) -> None:
    """The interim answer an Expect: 100-continue client waits for before it sends its body."""
    try:
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    except OSError:
        req.env[LINGER_ENV] = True
        raise ClientGone() from None


def _read(req: falcon.Request, stream: Any, size: int, seconds: Optional[float], pause: float,
          too_slow: Optional[Callable[[], str]]) -> bytes:
    """One read of the body within `seconds` (None: no timer), its failures as the proxy's errors. The
    timer is the pace's deadline when `too_slow` says why, else a pause of `pause` seconds."""
    stalled = "request body stalled: no data for %gs" % pause
    if seconds is not None and seconds <= 0:
        req.env[LINGER_ENV] = True
        raise BodyTimeout(too_slow() if too_slow else stalled)
    timer = gevent.Timeout(seconds)
    timer.start()
    try:
        return bytes(stream.read(size))
    except (gevent.Timeout, TimeoutError) as exc:  # the timer, or the socket's timeout on one receive
        if isinstance(exc, gevent.Timeout) and exc is not timer:
            raise
        req.env[LINGER_ENV] = True  # the rest of the body may never come: do not wait for it
        raise BodyTimeout(too_slow() if too_slow and exc is timer else stalled) from None
    except (ParseException, NoMoreData) as exc:  # bad chunked framing, or the client left mid-chunk
        req.env[LINGER_ENV] = True  # where the next request would start is unknown
        raise InvalidRequest("malformed chunked request body: %s" % exc) from None
    except OSError:  # the client reset the connection mid-body: not our error (it was a 500, a traceback)
        req.env[LINGER_ENV] = True
        raise ClientGone() from None
    finally:
        timer.cancel()


def parse_json(parse: Callable[[bytes], Any], body: bytes) -> Any:
    """`parse(body)`, with JSON nested too deeply for the decoder as a 400 (not a 500 RecursionError)."""
    try:
        return parse(body)
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None


def require_media(req: falcon.Request, accepted: tuple[str, ...]) -> None:
    """415 unless the Content-Type (when there is one) is one of `accepted` (`text/*` style allowed)."""
    if req.content_type is None:
        return
    media = req.content_type.split(";", 1)[0].strip().lower()
    if any(media == a or (a.endswith("/*") and media.startswith(a[:-1])) for a in accepted):
        return
    raise UnsupportedMediaType("Content-Type %r is not supported here; send %s" % (media, " or ".join(accepted)))
