"""Reading and checking a request's body: size, pace, framing, media type, JSON depth.

Runs in proxy workers on the request's greenlet; owns no socket (it reads the WSGI input gunicorn gives
the request). Every failure is a ProxyError the app turns into an OpenAI error body; one that leaves the
rest of the body unread also marks the request so the server hook closes the connection after the
answer (proxy/gunicorn_hooks.py, LINGER_ENV) instead of draining it through the worker.
"""
from __future__ import annotations

from typing import Any, Callable

import falcon
import gevent
from gunicorn.http.errors import NoMoreData, ParseException

from proxy.errors import BodyTimeout, BodyTooLarge, ClientGone, InvalidRequest, UnsupportedMediaType
from proxy.gunicorn_hooks import LINGER_ENV

READ_CHUNK = 65536  # bytes per read of a request body; the worker's other greenlets run in between


def read_body(req: falcon.Request, limit: int, timeout: float) -> bytes:
    """The request body, at most `limit` bytes, else 413 (at once when Content-Length says so, before
    reading anything). Chunked bodies (no Content-Length) are read to their end within the same limit.
    Read in 64 KiB pieces with a yield between them: gevent's recv does not yield while data is there,
    so one fast upload would otherwise hold the worker (and every stream on it) until it ends. Bad
    chunked framing is a 400 (gunicorn raises it from read(): it was a 500 with a traceback).
    A body that stalls, no byte for `timeout` seconds, is a 408 and the connection closes: gunicorn
    bounds only the wait for a request's headers, so a client that stopped mid-body held its connection
    (and a slot of --worker-connections) forever. A slow body that keeps coming is not a stall: under
    gunicorn the bound is the client socket's timeout, which every receive restarts (one 64 KiB read
    may take many); elsewhere (no `gunicorn.socket`) it is a timer per read."""
    chunked = req.content_length is None and "chunked" in (req.get_header("Transfer-Encoding") or "").lower()
    if req.content_length is not None and req.content_length > limit:
        raise BodyTooLarge("request body exceeds %d bytes" % limit)
    stream = req.stream if chunked else req.bounded_stream
    sock: Any = req.env.get("gunicorn.socket")
    per_receive = callable(getattr(sock, "settimeout", None))
    previous = sock.gettimeout() if per_receive else None
    if per_receive:
        sock.settimeout(timeout)
    timer = gevent.Timeout(None if per_receive else timeout)
    parts: list[bytes] = []
    size = 0
    try:
        while size <= limit:
            data = _read(req, stream, min(READ_CHUNK, limit + 1 - size), timer, timeout)
            if not data:
                break
            parts.append(data)
            size += len(data)
            gevent.sleep(0)
    finally:
        if per_receive:
            sock.settimeout(previous)  # a keep-alive connection's next request waits as gunicorn says
    if size > limit:
        raise BodyTooLarge("request body exceeds %d bytes" % limit)
    req.context.body_read = True
    return b"".join(parts)


def _read(req: falcon.Request, stream: Any, size: int, timer: gevent.Timeout, timeout: float) -> bytes:
    """One read of the body, its failures as the proxy's errors."""
    timer.start()
    try:
        return bytes(stream.read(size))
    except (gevent.Timeout, TimeoutError) as exc:  # the timer, or the socket's timeout on one receive
        if isinstance(exc, gevent.Timeout) and exc is not timer:
            raise
        req.env[LINGER_ENV] = True  # the rest of the body may never come: do not wait for it
        raise BodyTimeout("request body stalled: no data for %gs" % timeout) from None
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
