"""The proxy's gunicorn worker class: gunicorn's gevent worker that bounds idle client connections.

Runs in each proxy worker process (gevent, after fork); the master only imports the class (as it does
gunicorn's own gevent worker). Owns nothing beyond what GeventWorker owns: each client socket stays with
the greenlet that gunicorn gave it to. This class only records when a connection is idle or busy
(proxy/idle_connections.py decides which idle ones to close) and, to close one, shuts its socket down:
the greenlet reading it then sees the end of the connection and closes it as usual. A connection that
IdleConnections says to park is not served: its greenlet returns at once (freeing its pool slot; gevent
then closes that socket object) and a duplicate of its file descriptor keeps the connection open in
`_parked` until one sweeper greenlet closes it PARK_SECONDS later (or sooner, oldest first, past
PARK_MAX). Must never touch a busy connection.

Settings (ProxyConfig): --max-idle-per-client, --max-idle-connections (per worker).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

from proxy.idle_connections import IdleConnections

log = logging.getLogger(__name__)

PARK_SECONDS = 10.0  # how long a parked connection is held before it is closed
PARK_MAX = 10_000  # parked connections per worker (file descriptors); past it the oldest is closed


class ProxyGeventWorker(GeventWorker):
    def init_process(self) -> None:
        config = self.app.config  # proxy.server.ProxyApplication's ProxyConfig
        self._idle = IdleConnections(config.max_idle_per_client, config.max_idle_connections)
        self._sockets: dict[int, Any] = {}
        self._parked: deque[tuple[float, int]] = deque()  # (close at, duplicated fd)
        self._sweeper: Any = None
        self._ending: set[int] = set()  # connections to close after their current request
        super().init_process()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        key = id(client)
        serve, close = self._idle.opened(key, addr[0] if isinstance(addr, tuple) else str(addr))
        if not serve:
            self._park(client)
            return
        self._sockets[key] = client
        try:
            self._close(close)
            super().handle(listener, client, addr)
        finally:
            self._idle.closed(key)
            self._sockets.pop(key, None)

    def _park(self, client: Any) -> None:
        from proxy import metrics

        metrics.CONNECTIONS_PARKED.inc()
        try:
            fd = os.dup(client.fileno())
        except OSError:
            return
        self._parked.append((time.monotonic() + PARK_SECONDS, fd))
        while len(self._parked) > PARK_MAX:
            os.close(self._parked.popleft()[1])
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep)

    def _sweep(self) -> None:
        """Close parked connections whose time is up (one greenlet, started with the first one)."""
        while True:
            gevent.sleep(1.0)
            now = time.monotonic()
            while self._parked and self._parked[0][0] <= now:
                os.close(self._parked.popleft()[1])

    def end_connection(self, sock: Any) -> None:
        """Close this connection once its current request is over (post_request: a refused body was
        left unread, so the connection cannot carry another request): gunicorn's keep-alive loop would
        otherwise read on, draining what the client still sends through the worker's parser."""
        self._ending.add(id(sock))

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        key = id(sock)
        self._idle.busy(key)
        try:
            result = super().handle_request(listener_name, req, sock, addr)
        finally:
            if key in self._sockets:
                self._close(self._idle.idle(key))
            ending = key in self._ending
            self._ending.discard(key)
        if ending:
            raise StopIteration()  # gunicorn's handle(): "Closing connection", then it closes the socket
        return result

    def _close(self, keys: list[Any]) -> None:
        from proxy import metrics  # after fork: PROMETHEUS_MULTIPROC_DIR is set

        for key in keys:
            sock = self._sockets.get(key)
            if sock is None:
                continue
            metrics.IDLE_CLOSED.inc()
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
