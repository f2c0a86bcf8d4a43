"""All replica connections of one proxy worker, kept in step with the routing table.

Runs in each proxy worker (gevent); owns the worker's ReplicaConnections (proxy/replicas.py: each owns
its DEALER and monitor sockets) and nothing else. Called from the routing-table subscriber greenlet
(`sync`, `refresh`) and from request greenlets (`connections`, `get`). Must never drop a request that is
still streaming: a replica that leaves the table is retired and closed once drained.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Optional

import zmq
import zmq.green as zmq_green

from proxy.replicas import Capacity, ReplicaConnection, Secure
from runtime.protocol import RoutingTable

log = logging.getLogger(__name__)


class ReplicaPool:
    """All replica connections of one worker, kept in step with the routing table."""

    def __init__(self, ctx: zmq_green.Context, identity: bytes, hwm: int, secure: Optional[Secure] = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_capacity: Capacity = lambda deployment: None) -> None:
        self._ctx = ctx
        self._secure = secure
        self._identity = identity
        self._hwm = hwm
        self._clock = clock
        self._on_capacity = on_capacity
        self._by_id: dict[str, ReplicaConnection] = {}
        self._by_deployment: dict[str, list[ReplicaConnection]] = {}
        self._opened: dict[str, int] = {}  # endpoint in use -> connections (DEALERs) opened to it so far
        self._retired: dict[str, ReplicaConnection] = {}  # left the table, still draining
        self._refused: dict[str, str] = {}  # replica id -> endpoint that could not be connected (logged once)

    def _identity_for(self, endpoint: str) -> bytes:
        """The worker's identity; suffixed when reopening a connection to an endpoint we used before.

        A ROUTER ignores a new peer whose identity it still holds (unless ROUTER_HANDOVER is set), and
        after we close a DEALER the replica may not have noticed yet: a reopened connection with the
        same identity could silently swallow requests. The count of an endpoint is kept while a
        connection to it is open (`sync` forgets the others).
        """
        n = self._opened.get(endpoint, 0)
        self._opened[endpoint] = n + 1
        return self._identity if n == 0 else self._identity + b".%d" % n

    def sync(self, table: RoutingTable) -> None:
        """Open connections to new replicas; retire those that left the table (they close once their
        in-flight requests are done: a replica leaving routing is drained, not cut); close at once those
        that moved endpoint. Then take the table's loads and limits."""
        now = self._clock()
        wanted = {r.replica_id: (d.name, r) for d in table.deployments for r in d.replicas}
        refused: dict[str, str] = {}  # replica id -> endpoint libzmq refused in this table
        self._retired = {rid: c for rid, c in self._retired.items() if not c.closed}
        for rid, conn in list(self._by_id.items()):
            want = wanted.get(rid)
            if want is None or want[0] != conn.deployment or want[1].endpoint != conn.endpoint:
                del self._by_id[rid]
                if want is None and conn.inflight:
                    log.info("replica %s (%s) left the routing table; draining %d request(s)", rid,
                             conn.endpoint, len(conn.inflight))
                    self._retired[rid] = conn
                    conn.retire()
                else:
                    log.info("replica %s (%s) left the routing table; closing", rid, conn.endpoint)
                    conn.close("replica %s left the routing table" % rid)
        for rid, (deployment, route) in wanted.items():
            back = self._retired.get(rid)
            if back is not None and rid not in self._by_id and back.endpoint == route.endpoint \
                    and not back.closed:
                back.retired = False  # it came back before it drained: route to it again
                self._by_id[rid] = self._retired.pop(rid)
            known = self._by_id.get(rid)
            if known is not None:
                conn = known
            else:
                log.info("connecting to replica %s of %s at %s", rid, deployment, route.endpoint)
                identity = self._identity_for(route.endpoint)
                try:
                    conn = ReplicaConnection(
                        self._ctx, identity, deployment, route, self._hwm, self._secure, self._clock,
                        self._on_capacity, new_identity=functools.partial(self._identity_for, route.endpoint))
                except zmq.ZMQError as exc:
                    # an endpoint libzmq refuses (the replica reported it): this replica is not routed, the
                    # others are; before, the error ended the sync and no later replica got a connection
                    if self._refused.get(rid) != route.endpoint:
                        log.error("replica %s of %s: cannot connect to %r (%s); not routed", rid, deployment,
                                  route.endpoint, exc)
                    refused[rid] = route.endpoint
                    continue
                self._by_id[rid] = conn
            conn.table_update(route, now)
        self._refused = refused
        # endpoints no open connection uses forget their count: a later connection may take the plain
        # identity again (a replica still holding it hands it over: model_proc sets ROUTER_HANDOVER)
        in_use = {c.endpoint for c in self.all_connections()}
        self._opened = {e: n for e, n in self._opened.items() if e in in_use}
        by_dep: dict[str, list[ReplicaConnection]] = {}
        for conn in self._by_id.values():
            by_dep.setdefault(conn.deployment, []).append(conn)
        self._by_deployment = by_dep
        for deployment in {d.name for d in table.deployments}:
            self._on_capacity(deployment)

    def refresh(self, table: RoutingTable) -> None:
        """The head republished the same table: its loads are still current, as of now."""
        now = self._clock()
        for d in table.deployments:
            for route in d.replicas:
                conn = self._by_id.get(route.replica_id)
                if conn is not None and conn.endpoint == route.endpoint:
                    conn.table_update(route, now)

    def connections(self, deployment: str) -> list[ReplicaConnection]:
        return self._by_deployment.get(deployment, [])

    def get(self, replica_id: str) -> Optional[ReplicaConnection]:
        return self._by_id.get(replica_id)

    def replica_ids(self) -> list[str]:
        return list(self._by_id)

    def reachable(self) -> int:
        """Replicas in the table this worker is connected to, has not seen die, and that do not refuse
        its key (ReplicaConnection.reachable)."""
        return sum(1 for c in self._by_id.values() if c.reachable)

    def streams(self) -> int:
        """Requests in flight on every connection (retired ones included): this worker's streams."""
        return sum(len(c.inflight) for c in self.all_connections())

    def all_connections(self) -> list[ReplicaConnection]:
        return list(self._by_id.values()) + list(self._retired.values())

    def close_all(self) -> None:
        for conn in list(self._by_id.values()) + list(self._retired.values()):
            conn.close("proxy worker is shutting down")
        self._by_id.clear()
        self._retired.clear()
        self._by_deployment = {}
