"""Per-worker gateway: the one object the HTTP app talks to for routing and replica streams.

Runs in each proxy worker process. Created in gunicorn's `load()` (after fork, after gevent patched the
worker); `start()` runs from the `post_worker_init` hook and creates the worker's zmq.green Context, the
ReplicaPool and the TableSubscriber greenlet. It owns no socket itself: the subscriber greenlet owns the
head sockets and each ReplicaConnection its own. Must never create a zmq Context at import time or in the
gunicorn master (the master never imports this module).
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import time
from typing import Callable, Optional

import gevent
import zmq.green as zmq_green

from proxy import metrics
from proxy.config import ProxyConfig
from proxy.errors import ModelNotFound, NoHealthyReplica
from proxy.replicas import ReplicaPool, ReplicaUnavailable
from proxy.streams import RequestStream
from proxy.subscriber import TableSubscriber
from proxy.table_state import TableState
from runtime.curve import CurveKeys
from runtime.protocol import DeploymentRoute, GenerateRequest

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, config: ProxyConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        pid = os.getpid()
        rand = secrets.token_hex(2)
        self.worker_tag = "w%d-%s" % (pid, rand)
        self.identity = ("proxy-%s-%d-%s" % (socket.gethostname(), pid, rand)).encode()
        self._ids = itertools.count(1)
        self.state = TableState(config.stale_after)
        self.started_at = int(time.time())
        self._ctx: Optional[zmq_green.Context] = None
        self._pool: Optional[ReplicaPool] = None
        self._subscriber: Optional[gevent.Greenlet] = None

    def start(self) -> None:
        keys = CurveKeys.load(self.config.curve_dir)
        secure = keys.connect_as_client if keys is not None else None
        self._ctx = zmq_green.Context()
        self._pool = ReplicaPool(self._ctx, self.identity, self.config.hwm, secure=secure)
        sub = TableSubscriber(self._ctx, self.config.head, self.state, self._pool,
                              self.config.head_timeout, self.config.head_timeout_max, clock=self._clock,
                              on_tick=metrics.TABLE_AGE.set, secure=secure)
        self._subscriber = gevent.spawn(sub.run)
        log.info("[startup] worker %s identity %s%s", self.worker_tag, self.identity.decode(),
                 " (CURVE client)" if keys is not None else "")

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

    def has_deployment(self, name: str) -> bool:
        return self.state.deployment(name) is not None

    def deployments(self) -> list[DeploymentRoute]:
        return self.state.deployments()

    def readiness(self) -> tuple[bool, str]:
        if self._pool is None:
            return False, "proxy worker is starting"
        return self.state.readiness(self._clock())

    def open_stream(self, deployment: str, request: GenerateRequest) -> RequestStream:
        """Pick a replica, register the request and send it. Raises ModelNotFound / NoHealthyReplica."""
        route = self.state.deployment(deployment)
        if route is None:
            raise ModelNotFound(deployment)
        if not route.replicas:
            raise NoHealthyReplica("deployment %r has no healthy replica" % deployment)
        conn = self._pool.choose(deployment) if self._pool is not None else None
        if conn is None:
            raise NoHealthyReplica("no reachable replica for deployment %r" % deployment)
        stream = RequestStream(request.request_id, conn.replica_id, on_close=conn.release)
        try:
            conn.submit(stream, request)
        except ReplicaUnavailable as exc:
            raise NoHealthyReplica(str(exc)) from None
        return stream
