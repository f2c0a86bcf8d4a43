"""A plain pyzmq DEALER driven from a gevent worker without zmq.green: the proxy's one zmq fast path.

Runs in each proxy worker (gevent, after fork). Owns one DEALER socket (per replica connection) and a
gevent io watcher on its ZMQ_FD. Must never block: every call is NOBLOCK, and the only wait is `drain`'s
wait on a gevent Event.

Why: zmq.green's blocking recv builds a zmq.Again, an 11.6 s safety Timeout and an AsyncResult per wait,
and its own FD watcher reads EVENTS on every signal: 45 us more per message (benchmarks/README.md).

What it relies on, beyond pyzmq's public API (pinned in pyproject.toml; tests/unit/test_library_contracts.py
and tests/component/test_proxy_replica_reader.py fail if an upgrade changes it):
  * `zmq.backend.Socket.recv/send/get` called directly: libzmq's calls without pyzmq's Python wrappers
    (and plain-int flags: pyzmq's flag enums cost microseconds per operation);
  * ZMQ_FD is edge-triggered: it signals when the socket's EVENTS may have changed, and anything that
    reads EVENTS or sends on the socket can consume that edge.

Invariant (what keeps a wake-up from being lost): every send and every EVENTS read outside `drain` goes
through `poke`, which sets the reader's Event when a message is queued; `drain` clears the Event before
it reads EVENTS, so a message that arrives after its check sets the Event again. `drain` is the only
reader; one greenlet calls it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import gevent
import zmq
from gevent.event import Event

Secure = Callable[[zmq.Socket[Any]], None]  # configures a socket before connect (CURVE client keys)

DRAIN_BATCH = 1000  # messages handled in a row before the reader yields to other greenlets
_raw_recv = zmq.backend.Socket.recv
_raw_send = zmq.backend.Socket.send
_raw_get = zmq.backend.Socket.get
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


# The liveness bound of a replica: libzmq's I/O thread answers ZMTP pings even while the replica's Python
# loop is busy, so a missed pong means the process is frozen (SIGSTOP, swapped out) or its host is gone.
# Its requests are then resumed elsewhere (dispatch.Dispatch.resume) instead of waiting for it.
HEARTBEAT_IVL_MS = 500
LIVENESS_TIMEOUT_MS = 2000


class RawDealer:
    """One connected DEALER, its FD watcher and its reader's Event (see the module doc's invariant)."""

    __slots__ = ("_sock", "_endpoint", "_readable", "_fd_watch", "closed")

    def __init__(self, ctx: zmq.Context[Any], identity: bytes, endpoint: str, hwm: int,
                 monitor: Optional[tuple[str, int]] = None, secure: Optional[Secure] = None) -> None:
        """Connect to `endpoint`; `monitor`: (inproc address, events) for zmq's socket monitor."""
        sock: zmq.Socket[Any] = zmq.Socket(ctx, zmq.DEALER)  # plain, on the worker's context
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)  # ZMTP pings: a vanished host -> EVENT_DISCONNECTED
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, LIVENESS_TIMEOUT_MS)
        try:
            if monitor is not None:
                sock.monitor(*monitor)
            if secure is not None:
                secure(sock)  # CURVE client keys, before connect
            sock.connect(endpoint)
        except BaseException:  # an endpoint libzmq refuses: close what was opened (the socket, its monitor)
            sock.close(0)
            raise
        self._sock = sock
        self._endpoint = endpoint
        self.closed = False
        self._readable = Event()  # set when a message may be queued: ZMQ_FD fired, or poke saw POLLIN
        self._fd_watch = gevent.get_hub().loop.io(sock.getsockopt(zmq.FD), 1)
        self._fd_watch.start(self._readable.set)

    def send(self, type_byte: bytes, payload: bytes) -> None:
        """Queue one two-frame message without blocking; zmq.Again when the HWM is reached."""
        sock = self._sock
        try:
            _raw_send(sock, type_byte, _NOBLOCK | _SNDMORE)  # once the first part is in, so is the rest
            _raw_send(sock, payload, _NOBLOCK)
        finally:
            self.poke()

    def poke(self) -> bool:
        """Read EVENTS (which may consume ZMQ_FD's edge) and wake the reader if a message is queued.
        True if one is."""
        if self.closed:
            return False
        if int(_raw_get(self._sock, _EVENTS)) & _POLLIN:
            self._readable.set()
            return True
        return False

    def drain(self, handle: Callable[[list[bytes]], None]) -> None:
        """Hand every message to `handle` as it arrives, forever (until killed or a socket error)."""
        sock, readable = self._sock, self._readable
        while True:
            readable.clear()  # before EVENTS: a message that comes after the check sets it again
            n = 0
            while int(_raw_get(sock, _EVENTS)) & _POLLIN:
                frames = [_raw_recv(sock, _NOBLOCK)]
                while _raw_get(sock, _RCVMORE):
                    frames.append(_raw_recv(sock, _NOBLOCK))
                handle(frames)
                n += 1
                if n == DRAIN_BATCH:  # without parking: let the request greenlets run
                    gevent.sleep(0)
                    n = 0
            readable.wait()

    def stop_watching(self) -> None:
        """Stop the FD watcher (the reader ended: nobody would clear its signal, and a level-triggered
        watcher on a signalled FD would spin the worker's loop)."""
        self._fd_watch.stop()

    def reconnect(self) -> None:
        """Drop the connection and make a new one (a new handshake, which the replica's ZAP judges again);
        what was queued on the old one is lost."""
        self._sock.disconnect(self._endpoint)
        self._sock.connect(self._endpoint)

    def close(self) -> None:
        """Stop watching, then close the socket (linger 0). Call after the reader greenlet ended."""
        if self.closed:
            return
        self.closed = True
        self._fd_watch.stop()  # before the socket (and its FD) goes
        self._fd_watch.close()
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._sock.close(linger=0)
