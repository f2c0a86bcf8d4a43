"""Writes a streaming response's tokens straight to the client's socket from the replica reader greenlet.

Runs in proxy workers, on the per-token path. The normal path for one token is: the reader greenlet
pushes it onto the request's RequestStream and sets its Event; the hub switches to the request greenlet,
which wakes from `Event.wait` (a new gevent Timeout per wait), renders the chunk, yields it to gunicorn,
whose `Response.write` frames it and calls gevent's `sendall` (a `getsockopt(SO_SNDBUF)` per call); then
the request greenlet parks again. At 1,000 streams that was most of the proxy's CPU (benchmarks/README.md).

A ClientSink does the same job in the reader greenlet with no switch at all: render, frame as an HTTP/1.1
chunk, one non-blocking `send` on the client's socket. The request greenlet stays parked until something
needs it: the final token (sent through gunicorn, which then ends the chunked body), an error, the idle
timeout, or the sink giving up (below).

Ownership of the client socket: the sink is attached (`RequestStream.sink`) only while the request
greenlet is parked with nothing queued, and the request greenlet detaches it before it writes anything
itself. Greenlets of one worker share one OS thread and switch only when one blocks, and the sink never
blocks, so the two never write at once and bytes reach the client in order.

The sink gives up (returns False: the stream detaches it and wakes the request greenlet) when:
- the socket took only part of a chunk (the client reads slowly): the rest is in `unsent`, the request
  greenlet sends it (blocking, green) and from then on coalesces as usual, re-attaching the sink once it
  has caught up;
- the send failed (the client is gone): `error` says why and the request greenlet ends the response,
  which aborts the request at the replica.

Only for plain-TCP gunicorn connections answering HTTP/1.1 with a chunked body: `for_environ` returns
None otherwise (another WSGI server, TLS, HTTP/1.0), and the stream then uses the normal path.
"""
from __future__ import annotations

import _socket
import socket
from typing import Any, Callable, Optional

from proxy.metrics import RequestTracker
from runtime.protocol import Delta

Encode = Callable[[str], bytes]  # delta text -> bytes; the response bytes are head + encode(text) + tail


class ClientSink:
    __slots__ = ("_sock", "_raw", "_head", "_encode", "_tail", "_fixed", "_tracker", "unsent", "error",
                 "chunks", "last_at")

    def __init__(self, sock: Any, raw: Any, template: tuple[bytes, Encode, bytes],
                 tracker: RequestTracker) -> None:
        self._sock = sock  # gevent's socket: the request greenlet's blocking (green) sendall
        self._raw = raw  # the kernel socket under it: with MSG_DONTWAIT its send never waits
        self._head, self._encode, self._tail = template  # e.g. b'data: {..."text":', json, b'...}\n\n'
        self._fixed = len(self._head) + len(self._tail)
        self._tracker = tracker
        self.unsent = b""  # the tail of a chunk the socket did not take; sent by the request greenlet
        self.error: Optional[OSError] = None
        self.chunks = 0  # chunks written here (tokenrelay_proxy_direct_chunks_total at close)
        self.last_at = float("-inf")  # when the last token went out here (the tracker's clock)

    @classmethod
    def for_environ(cls, environ: dict[str, Any], template: tuple[bytes, Encode, bytes],
                    tracker: RequestTracker) -> Optional["ClientSink"]:
        """A sink for this request's connection, or None where direct writes are not safe."""
        sock = environ.get("gunicorn.socket")
        if sock is None or environ.get("SERVER_PROTOCOL") != "HTTP/1.1" or hasattr(sock, "do_handshake"):
            return None  # not gunicorn, not chunked (HTTP/1.0), or TLS (bytes must go through SSL)
        raw = getattr(sock, "_sock", sock)  # gevent's socket wraps the real one (see middleware.client_probe)
        if not isinstance(raw, _socket.socket):  # the C base of both (gevent's patching replaces SocketType)
            return None
        return cls(sock, raw, template, tracker)

    def offer(self, delta: Delta) -> bool:
        """Write one non-final delta; False when the request greenlet must take over (see module doc).
        The delta is consumed either way."""
        body = self._encode(delta.text)
        size = self._fixed + len(body)
        if not size:  # an empty chunk would end the chunked body
            self.last_at = self._tracker.token()
            return True
        frame = b"%X\r\n%b%b%b\r\n" % (size, self._head, body, self._tail)
        try:
            sent = self._raw.send(frame, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:  # reset, broken pipe: the client is gone
            self.error = exc
            return False
        self.last_at = self._tracker.token()
        self.chunks += 1
        if sent < len(frame):
            self.unsent = frame[sent:]
            return False
        return True

    def flush(self) -> None:
        """Send `unsent`, blocking this greenlet until the client takes it. Request greenlet only, with the
        sink detached; a failure goes to `error`, but the socket's timeout (--send-timeout) is raised."""
        try:
            self._sock.sendall(self.unsent)
        except TimeoutError:  # --send-timeout, as for a write of the WSGI body: the worker counts the
            self.unsent = b""  # stalled client and closes its connection (proxy/gunicorn_worker.py)
            raise
        except OSError as exc:
            self.error = exc
        self.unsent = b""
