"""What the proxy changes in gunicorn's own handling of bad clients (the app never sees these).

Runs in proxy workers (gevent, after fork); owns no socket of its own: `linger_close` works on the
client socket of a request that is over, from the `post_request` hook. Relies on gunicorn internals
pinned by tests/unit/test_library_contracts.py: `gunicorn.util.write_error(sock, status_int, reason,
mesg)`, which the worker's `handle_error` calls for requests it could not parse (bad request line or
headers, 414, 431, 400 for a NUL in the path or a non-printable header value, bad chunked framing).

  install_json_errors()  those errors become OpenAI-style JSON bodies with an X-Request-ID, like every
                         error the app makes, instead of gunicorn's HTML page; the connection then
                         lingers (below) so the rest of the bad request cannot reset it first
  linger_close(sock)     close a connection whose request body was refused unread (413, 401, ...): send
                         FIN, then read and drop what the client still sends for at most LINGER_SECONDS
                         and LINGER_BYTES, yielding between reads, then close. gunicorn would otherwise
                         drain the whole body through the worker's parser before the next request, and
                         gevent's recv does not yield while data keeps coming: one 100 MB upload held
                         every other stream of the worker for seconds.
"""
from __future__ import annotations

import logging
import secrets
import socket
import time
from typing import Any

import msgspec

from proxy.errors import error_body
from runtime.protocol import error_type_for
from proxy.loop_turns import TURNS

log = logging.getLogger(__name__)

LINGER_ENV = "tokenrelay.linger_close"  # the app sets it in the environ: linger_close after the response
CONTINUE_ENV = "tokenrelay.continue"  # True: an Expect: 100-continue is owed, sent when the body is read
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 << 20
ERROR_LINGER_SECONDS = 0.5
_CODES = {400: "bad_request", 414: "uri_too_long", 431: "request_header_fields_too_large",
          403: "forbidden", 417: "expectation_failed", 501: "not_implemented", 500: None}


def json_error_response(status_int: int, reason: str, mesg: str) -> bytes:
    """A whole HTTP/1.1 response (Connection: close) with an OpenAI-style error body."""
    request_id = "err-" + secrets.token_hex(6)
    message = "%s: %s" % (reason, mesg) if mesg else reason
    body = msgspec.json.encode(error_body(message, error_type_for(status_int), None, _CODES.get(status_int)))
    head = ("HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Type: application/json\r\n"
            "X-Request-ID: %s\r\nContent-Length: %d\r\n\r\n" % (status_int, reason, request_id, len(body)))
    log.info("req=%s HTTP request refused by the server: %d %s", request_id, status_int, message)
    return head.encode("latin-1") + body


def install_json_errors() -> None:
    """Replace gunicorn's HTML error page (gunicorn.util.write_error) in this worker."""
    from gunicorn import util

    def write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
        util.write_nonblock(sock, json_error_response(status_int, reason, mesg))
        # what the client sent past the error is unread: closing now would reset the connection and
        # could destroy the response before the client reads it
        linger_close(sock, ERROR_LINGER_SECONDS, LINGER_BYTES)

    util.write_error = write_error


def linger_close(sock: Any, seconds: float = LINGER_SECONDS, max_bytes: int = LINGER_BYTES) -> None:
    """Half-close, drop what the client still sends (bounded, yielding), then shut the socket down so
    gunicorn's keep-alive loop sees the end of the connection and closes it. Not on a TLS socket: its
    shutdown drops the TLS layer under gunicorn, so there gunicorn closes (or drains) as it would."""
    if hasattr(sock, "getpeercert"):
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    deadline = time.monotonic() + seconds
    dropped = 0
    old_timeout = sock.gettimeout()
    try:
        while dropped < max_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                break
            dropped += len(data)
            TURNS.take()
    except (OSError, socket.timeout):
        pass
    finally:
        try:
            sock.settimeout(old_timeout)
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
