"""Which idle client connections a proxy worker closes to bound them per client address and in total.

Pure logic; runs in each proxy worker (proxy/gunicorn_worker.py drives it); owns no socket and never
reads the clock. A connection is *idle* while the server waits for its next request head (just accepted,
or between keep-alive requests), *busy* while a request is handled (a stream in flight is busy). Idle
connections cost a slot of the worker's connection pool and hold nothing a client is waiting for; a flood
of them (slowloris, thousands of reconnecting sockets) would fill the pool and make every new client wait.

Rules:
  * a new connection from an address that already has `per_client` idle ones is *parked*: not served,
    held open without a pool slot until it is closed after a while (the caller does that). Closing it
    at once would not help: a flooding client reconnects at once, and the accept churn alone would eat
    the worker's CPU; a parked connection just hangs, as the flooder wanted, at the cost of one fd.
  * a connection that goes back to idle (keep-alive) while its address has too many idle ones closes
    that address's oldest idle one;
  * when the worker then has more than `total` idle ones, the oldest idle one of all is closed
    (legitimate clients send their request head within milliseconds and are rarely the oldest).
So a flood from one address only ever costs that address, and busy connections are never touched.
--header-timeout (proxy/gunicorn_worker.py) still closes any connection whose request head is not in after that long.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

Conn = Hashable


class IdleConnections:
    def __init__(self, per_client: int, total: int) -> None:
        if per_client < 1 or total < 1:
            raise ValueError("idle connection limits must be >= 1")
        self.per_client = per_client
        self.total = total
        self._idle: OrderedDict[Conn, str] = OrderedDict()  # oldest idle first
        self._by_client: dict[str, OrderedDict[Conn, None]] = {}
        self._client: dict[Conn, str] = {}

    def __len__(self) -> int:
        return len(self._idle)

    def idle_of(self, client: str) -> int:
        return len(self._by_client.get(client, ()))

    def opened(self, conn: Conn, client: str) -> tuple[bool, list[Conn]]:
        """A new connection (idle until its first request head). Returns (serve it, connections to
        close); not served means park it (and do not call `closed` for it)."""
        if self.idle_of(client) >= self.per_client:
            return False, []
        self._client[conn] = client
        return True, self.idle(conn)

    def idle(self, conn: Conn) -> list[Conn]:
        """`conn` waits for a request head again; returns the connections to close (never `conn`
        itself unless it is the oldest, which cannot be when others of its address are idle)."""
        client = self._client[conn]
        self._idle[conn] = client
        mine = self._by_client.setdefault(client, OrderedDict())
        mine[conn] = None
        evict: list[Conn] = []
        if len(mine) > self.per_client:
            evict.append(next(iter(mine)))
            self._forget_idle(evict[-1])
        if len(self._idle) > self.total:
            evict.append(next(iter(self._idle)))
            self._forget_idle(evict[-1])
        return evict

    def busy(self, conn: Conn) -> None:
        """A request head arrived on `conn`."""
        self._forget_idle(conn)

    def closed(self, conn: Conn) -> None:
        self._forget_idle(conn)
        self._client.pop(conn, None)

    def _forget_idle(self, conn: Conn) -> None:
        client = self._idle.pop(conn, None)
        if client is None:
            return
        mine = self._by_client[client]
        del mine[conn]
        if not mine:
            del self._by_client[client]
