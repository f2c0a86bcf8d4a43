"""Per-worker gateway: the one object the HTTP app talks to for routing and replica streams.

Runs in each proxy worker process. Created in gunicorn's `load()` (after fork, after gevent patched the
worker); `start()` runs from the `post_worker_init` hook and creates the worker's zmq.green Context, the
ReplicaPool and the TableSubscriber greenlet. It owns no socket itself: the subscriber greenlet owns the
head sockets and each ReplicaConnection its own. Must never create a zmq Context at import time or in the
gunicorn master (the master never imports this module).

It is the Cluster a Dispatch works against (dispatch.py): replica choice (router.Router over the pool's
load views, with each replica's circuit breaker), sends, the per-deployment admission queues, and the
breaker bookkeeping. Queued requests are woken when the pool reports that room may have appeared.
A deployment that scales to zero (DeploymentRoute.cold_start_timeout_s > 0) with no replica makes its
requests wait up to that timeout, and the subscriber tells the head (ScaleDemand, at most once a second).
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Callable, Optional

import gevent
import zmq.green as zmq_green

from proxy import metrics
from proxy.admission import AdmissionQueue
from proxy.breaker import Breakers
from proxy.config import ProxyConfig
from proxy.replica_pool import ReplicaPool
from proxy.replicas import ReplicaConnection, ReplicaUnavailable
from proxy.router import DOWN, NONE, Decision, Policy, Router
from proxy.streams import RequestStream
from proxy.subscriber import TableSubscriber
from proxy.table_state import TableState
from runtime import curve, keyring
from runtime.protocol import DeploymentRoute, GenerateRequest, loggable_identity

log = logging.getLogger(__name__)

DEMAND_EVERY = 1.0  # seconds between two ScaleDemand of one deployment while its requests wait


def advertised_endpoint(bind: str) -> str:
    """HOST:PORT where others reach this proxy's HTTP port (and /metrics): the bind address, or this
    host's name when it binds every interface."""
    host, _, port = bind.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.getfqdn()
    return "%s:%s" % (host, port)


class Gateway:
    def __init__(self, config: ProxyConfig, clock: Callable[[], float] = time.monotonic,
                 router: Optional[Router] = None) -> None:
        self.config = config
        self.clock = clock
        pid = os.getpid()
        rand = secrets.token_hex(2)
        self.worker_tag = "w%d-%s" % (pid, rand)
        # the ZeroMQ identity must not be guessable: replicas set ROUTER_HANDOVER, so a peer connecting
        # with our identity takes over our streams. worker_tag is public (in every response id), hence
        # a separate 128-bit secret here
        self.identity = ("proxy-%s-%d-%s" % (socket.gethostname(), pid, secrets.token_hex(16))).encode()
        self._ids = itertools.count(1)
        self.state = TableState(config.stale_after)
        self.started_at = int(time.time())
        self._router = router or Router()
        self._breakers = Breakers(config.breaker_failures, config.breaker_cooldown, config.breaker_max_share)
        self._queues: dict[str, AdmissionQueue] = {}
        self._listed_at: dict[str, float] = {}  # deployment -> last time it had a replica connection
        self._demand_at: dict[str, float] = {}  # scaled-to-zero deployment -> last ScaleDemand noted
        self._ctx: Optional[zmq_green.Context] = None
        self._pool: Optional[ReplicaPool] = None
        self._subscriber: Optional[gevent.Greenlet] = None
        self._sub: Optional[TableSubscriber] = None

    def start(self) -> None:
        keys = Path(self.config.curve_dir) if self.config.curve_dir else None
        to_head = to_replicas = None
        curve_note = ""
        if keys is not None:  # this proxy's key; the head's and the replicas' public keys (runtime.keyring)
            me = keyring.identity(keys, "proxy")
            to_head = curve.client(me, keyring.server_public(keys, "head"))
            to_replicas = curve.client(me, keyring.server_public(keys, "replica"))
            curve_note = " (CURVE client as %s-%s)" % (me.role, me.name)
        self._ctx = zmq_green.Context()
        self._pool = ReplicaPool(self._ctx, self.identity, self.config.hwm, secure=to_replicas, clock=self.clock,
                                 on_capacity=self._on_capacity)
        sub = TableSubscriber(self._ctx, self.config.head, self.state, self._pool,
                              self.config.head_timeout, self.config.head_timeout_max, clock=self.clock,
                              on_tick=metrics.TABLE_AGE.set, secure=to_head,
                              http_endpoint=advertised_endpoint(self.config.bind),
                              on_table=metrics.table_applied)
        self._sub = sub
        self._subscriber = gevent.spawn(sub.run)
        log.info("[startup] worker %s identity %s-...%s", self.worker_tag, loggable_identity(self.identity),
                 curve_note)

    def streams(self) -> int:
        """Requests this worker has in flight at replicas (0 before start and after stop)."""
        return self._pool.streams() if self._pool is not None else 0

    def stop(self) -> None:
        if self._subscriber is not None:
            self._subscriber.kill(block=True, timeout=2)
            self._subscriber = None
        if self._pool is not None:
            self._pool.close_all()
            self._pool = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        log.info("[shutdown] worker %s closed its sockets", self.worker_tag)

    # ----------------------------------------------------------------- Backend (see app.py)

    def next_request_id(self) -> str:
        return "%s-%d" % (self.worker_tag, next(self._ids))

    def has_table(self) -> bool:
        return self.state.table is not None

    def deployment(self, name: str) -> Optional[DeploymentRoute]:
        return self.state.deployment(name)

    def deployments(self) -> list[DeploymentRoute]:
        return self.state.deployments()

    def readiness(self) -> tuple[bool, str]:
        if self._pool is None:
            return False, "proxy worker is starting"
        return self.state.readiness(self.clock(), self._pool.reachable())

    # ----------------------------------------------------------------- Cluster (see dispatch.py)

    def choose(self, deployment: str, key: Optional[str], exclude: frozenset[str]) -> Decision:
        route = self.state.deployment(deployment)
        if route is None or self._pool is None:
            return Decision(NONE)
        now = self.clock()
        conns = self._pool.connections(deployment)
        if conns:
            self._listed_at[deployment] = now
        elif route.cold_start_timeout_s > 0:
            # scaled to zero (or not up yet): wait in the queue (router.DOWN, up to the cold-start
            # timeout) and tell the head, at most once a second, that requests wait
            if self._sub is not None and now - self._demand_at.get(deployment, float("-inf")) >= DEMAND_EVERY:
                self._demand_at[deployment] = now
                q = self._queues.get(deployment)
                self._sub.note_demand(deployment, max(1, len(q) if q is not None else 0))
            return Decision(DOWN)
        elif now - self._listed_at.get(deployment, float("-inf")) < route.routing.queue_timeout_s:
            # it had replicas a moment ago: the table lost them all at once (their agent restarts
            # them); wait in the queue for them (router.DOWN) rather than refuse at once
            return Decision(DOWN)
        views = [c.view(not c.draining and self._breakers.get(_incarnation(c)).allow(now)) for c in conns]
        policy = Policy(route.routing.policy, route.routing.max_imbalance, self.config.load_stale_after,
                        self.config.workers)
        return self._router.choose(views, policy, now, key, exclude)

    def send(self, replica_id: str, request: GenerateRequest) -> RequestStream:
        conn = self._pool.get(replica_id) if self._pool is not None else None
        if conn is None:
            raise ReplicaUnavailable("replica %s is no longer in the routing table" % replica_id)
        stream = RequestStream(request.request_id, replica_id, on_close=conn.release,
                               max_pending=self.config.max_pending_chars)
        conn.submit(stream, request)
        if self._breakers.get(_incarnation(conn)).on_send(self.clock()):
            log.info("[failover] req=%s probes ejected replica %s", request.request_id, replica_id)
        return stream

    def queue(self, deployment: str) -> AdmissionQueue:
        route = self.state.deployment(deployment)
        size, timeout = (route.routing.queue_size, route.routing.queue_timeout_s) if route else (0, 0.0)
        if route is not None and route.cold_start_timeout_s > 0 and self._pool is not None \
                and not self._pool.connections(deployment):
            timeout = route.cold_start_timeout_s  # no replica: requests wait for one to start, this long
        q = self._queues.get(deployment)
        if q is None:
            q = self._queues[deployment] = AdmissionQueue(size, timeout)
        elif (q.size, q.timeout) != (size, timeout):
            q.resize(size, timeout)
        return q

    def record(self, replica_id: str, ok: bool) -> None:
        """An outcome of the replica's current incarnation (a connection that is gone records nothing)."""
        conn = self._pool.get(replica_id) if self._pool is not None else None
        if conn is None:
            return
        key = _incarnation(conn)
        breaker = self._breakers.get(key)
        now = self.clock()
        if ok:
            if breaker.state(now) != "closed":
                log.info("[failover] replica %s answered again; back in rotation", replica_id)
            breaker.success(now)
            return
        assert self._pool is not None
        peers = [_incarnation(c) for c in self._pool.connections(conn.deployment)]
        opened, capped = self._breakers.failure(key, peers, now)
        if opened:
            metrics.EJECTIONS.labels(conn.deployment).inc()
            log.warning("[failover] replica %s of %s ejected for %.1fs after repeated failures", replica_id,
                        conn.deployment, breaker.current_cooldown)
        elif capped:
            log.warning("[failover] replica %s of %s keeps failing but stays in rotation: %.0f%% of the "
                        "deployment is ejected already (--breaker-max-share)", replica_id, conn.deployment,
                        self.config.breaker_max_share * 100)
        if len(self._breakers) > 4096:  # replicas come and go: forget the incarnations long gone
            self._breakers.forget_except(_incarnation(c) for c in self._pool.all_connections())

    def _on_capacity(self, deployment: str) -> None:
        q = self._queues.get(deployment)
        if q is not None:
            q.wake_first()


def _incarnation(conn: ReplicaConnection) -> tuple[str, str]:
    """Whose breaker: a replica process, told apart from a restarted one by its endpoint (a replica binds
    a fresh port each start; the pool opens a new connection when the endpoint changes)."""
    return conn.replica_id, conn.endpoint
