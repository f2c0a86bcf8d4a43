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

Three more things at the edge of each request, where only the worker can reach gunicorn's objects:
  * the header deadline: gunicorn reads each request head (and drains the unread rest of the previous
    body) inside `timeout_ctx()`, one gevent.Timeout for the whole head, not per receive; here it lasts
    --header-timeout instead of gunicorn's whole-second `keepalive`. Past it the connection closes
    without an answer (as nginx's client_header_timeout does): it may be an idle keep-alive connection.
  * `Connection: close` on every answer after which the connection closes: the app marks those in the
    environ (LINGER_ENV: a body left unread, a 408, broken chunked framing); gunicorn ignores a
    Connection header from the app, so `_serve` calls force_close() on gunicorn's Response (the
    start_response it passes is that Response's bound method) before the headers go out. Without it a
    client was told keep-alive and then found the connection closed under its next request.
  * Expect: 100-continue: gunicorn answers "100 Continue" before the app runs, so the client sent its
    body even when the answer was a 401 or a 413. The worker takes that over (CONTINUE_ENV):
    proxy/request_body.py sends it when it reads the body; an answer given without it closes the
    connection (the client may or may not send the body then: where the next request starts is unknown).

It also yields between the requests of one connection, so a client that pipelines thousands of
requests in one burst cannot hold the worker's other streams while they are answered; and it gives
each request's client socket the --send-timeout as its timeout: every blocking write of the response
(gunicorn's, and proxy.client_sink's catch-up) must be taken by the client within it, else the write
fails, the request ends (aborted at its replica) and the connection closes with one log line. A write
is one coalesced chunk of a stream, or WRITE_SLICE bytes of a one-piece answer (`_sliced`). The
direct writes of proxy.client_sink never block and are not affected; proxy.request_body sets its own
timeout per receive while it reads a body, and puts this one back.

Settings (ProxyConfig): --max-idle-per-client, --max-idle-connections (per worker), --header-timeout,
--send-timeout.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from typing import Any, Iterator

import gevent
from gunicorn.workers.ggevent import GeventWorker

from proxy.gunicorn_hooks import CONTINUE_ENV, LINGER_ENV
from proxy.idle_connections import IdleConnections
from proxy.loop_turns import TURNS

log = logging.getLogger(__name__)

PARK_SECONDS = 10.0  # how long a parked connection is held before it is closed
PARK_MAX = 10_000  # parked connections per worker (file descriptors); past it the oldest is closed
WRITE_SLICE = 65536  # bytes per write of a one-piece answer (a JSON body), each within --send-timeout


class ProxyGeventWorker(GeventWorker):
    def init_process(self) -> None:
        config = self.app.config  # proxy.server.ProxyApplication's ProxyConfig
        self._idle = IdleConnections(config.max_idle_per_client, config.max_idle_connections)
        self._sockets: dict[int, Any] = {}
        self._parked: deque[tuple[float, int]] = deque()  # (close at, duplicated fd)
        self._sweeper: Any = None
        self._ending: set[int] = set()  # connections to close after their current request
        self._expecting: set[int] = set()  # connections whose request waits for a 100 Continue
        self._header_timeout = config.header_timeout
        self._send_timeout = config.send_timeout
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self._app: Any = self.wsgi  # type: ignore[has-type]  # set by gunicorn's untyped load_wsgi
        self.wsgi = self._serve

    def timeout_ctx(self) -> Any:
        """The deadline for one request head (gunicorn's keep-alive loop reads it inside this)."""
        return gevent.Timeout(self._header_timeout, False)

    def _serve(self, environ: dict[str, Any], start_response: Any) -> Any:
        """The app, with the 100 Continue it owes and an honest Connection header (module docstring)."""
        if id(environ.get("gunicorn.socket")) in self._expecting:
            environ[CONTINUE_ENV] = True

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if environ.get(CONTINUE_ENV) is True and _has_body(environ):
                environ[LINGER_ENV] = True  # answered without asking for the body
            if environ.get(LINGER_ENV):
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if force_close is not None:
                    force_close()
            return start_response(status, headers, exc_info)
        result = self._app(environ, start)
        if isinstance(result, list) and any(len(part) > WRITE_SLICE for part in result):
            return _sliced(result)  # each write within --send-timeout is then one slice, not the whole answer
        return result

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
        if getattr(req, "_expected_100_continue", False):  # gunicorn's wsgi.create would send it now
            req._expected_100_continue = False
            self._expecting.add(key)
        try:
            sock.settimeout(self._send_timeout)
            result = super().handle_request(listener_name, req, sock, addr)
        except TimeoutError:  # a response write the client took nothing of for --send-timeout
            from proxy import metrics

            metrics.CLIENTS_STALLED.inc()
            log.warning("client %s did not take a response write within %gs (--send-timeout): closing its "
                        "connection", addr[0] if isinstance(addr, tuple) else addr, self._send_timeout)
            raise StopIteration() from None  # gunicorn's handle(): "Closing connection"; the response's
            # iterator was closed on the way out (the request is aborted at its replica)
        finally:
            if key in self._sockets:
                self._close(self._idle.idle(key))
            ending = key in self._ending
            self._ending.discard(key)
            self._expecting.discard(key)
        if ending:
            raise StopIteration()  # gunicorn's handle(): "Closing connection", then it closes the socket
        # Let the worker's other greenlets run before the next request of this connection: requests
        # pipelined in one burst are all in the socket buffer, and gevent's recv does not yield while
        # data is there (20,000 pipelined GET /health held every stream of the worker for 1.9 s).
        TURNS.take()
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


def _sliced(parts: list[bytes]) -> Iterator[bytes]:
    """A body written WRITE_SLICE bytes at a time (gunicorn sends each item with one sendall, whose
    timeout, gevent's, bounds the whole call: a 6 MB answer to a client reading 80 KB/s would miss it)."""
    for part in parts:
        for start in range(0, len(part), WRITE_SLICE):
            yield part[start:start + WRITE_SLICE]


def _has_body(environ: dict[str, Any]) -> bool:
    return environ.get("CONTENT_LENGTH") not in (None, "", "0") or bool(environ.get("HTTP_TRANSFER_ENCODING"))
