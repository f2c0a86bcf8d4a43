"""Connections from one proxy worker to every replica in the routing table.

Runs in each proxy worker (gevent, after fork). Sockets, per replica:
  * one zmq.green DEALER connected to the replica's data ROUTER (`ReplicaRoute.endpoint`). All DEALERs of
    a worker share one identity, so a replica sees one peer per worker (a reopened connection to an
    endpoint gets a suffix, see ReplicaPool._identity_for). Its reader greenlet is the only
    one that recvs on it. Request greenlets send GenerateRequest/Abort on it with NOBLOCK: the worker
    is one OS thread and a NOBLOCK send never yields, so each multipart send is atomic with respect to
    other greenlets (and libzmq keeps multipart messages atomic against the HWM).
  * its monitor PAIR (EVENT_CONNECTED/EVENT_DISCONNECTED), owned and read by a watcher greenlet.
  `ReplicaConnection.close` stops both greenlets and then closes both sockets (linger 0).

Why two greenlets and not one zmq.green Poller over both sockets: the green Poller waits on the
edge-triggered ZMQ_FD, and a send from a request greenlet can consume that edge, leaving the reader asleep
for up to zmq.green's 1.33 s safety poll. A blocking green recv is woken by every send
(`__state_changed`), so tokens are never held back.

Failure handling: ReplicaDead, a lost TCP connection (a replica SIGKILLed says nothing; libzmq heartbeats
catch a vanished host) and leaving the routing table all fail every in-flight request on that replica.
Must never block in a reader (it serves every request on the replica) nor raise out of a greenlet silently.

Load: each connection keeps the replica's latest load report (router.ReplicaView): from the TokenBatches
it sends (`TokenBatch.load`, made when sent, so dated on receipt) or from the routing table (made up to
TABLE_REPORT_LAG before the table arrived: the replica's 250 ms status, the agent's 500 ms heartbeat and
the head's tick). The newer report wins. `on_capacity(deployment)` is called whenever room may have
appeared (a request of this worker ended, the replica sent a new load report, the table changed), so
requests queued for that deployment retry at once.

Slow clients: a stream that refuses a delta (its pending text is over the bound) is aborted at the
replica at once and failed with SLOW_READER_STATUS, so neither the proxy nor the replica buffers more.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import gevent
import zmq
import zmq.green as zmq_green
from zmq.utils.monitor import recv_monitor_message

from proxy import metrics
from proxy.router import ReplicaView
from proxy.streams import RequestStream
from runtime.protocol import (
    Abort, GenerateRequest, ProtocolError, ReplicaDead, ReplicaRoute, RequestError, RoutingTable,
    TokenBatch, decode_frames, encode,
)

log = logging.getLogger(__name__)

Secure = Callable[[zmq.Socket], None]  # configures a socket before connect (CURVE client keys)

_DRAIN = 1000  # messages handled in a row before the reader yields to request greenlets
_raw_recv = zmq.backend.Socket.recv  # libzmq's calls without zmq.green's bookkeeping (_recv_queued)
_raw_get = zmq.backend.Socket.get
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
TABLE_REPORT_LAG = 1.0  # seconds a load in the routing table may be older than the table itself
SLOW_READER_STATUS = 408  # status (metrics, logs) of a stream cut off because the client read too slowly


def _recv_queued(sock: zmq.Socket) -> list[bytes]:
    """The next queued message, else zmq.Again (never yields): 2.4 us against zmq.green's 8.6, whose extra
    work wakes other waiters, and there are none (only the reader receives; sends are NOBLOCK)."""
    frames = [_raw_recv(sock, _NOBLOCK)]
    while _raw_get(sock, _RCVMORE):
        frames.append(_raw_recv(sock, _NOBLOCK))
    return frames


class ReplicaUnavailable(Exception):
    """Sending to the replica failed (socket closed, or its send queue is full)."""


Capacity = Callable[[str], None]  # called with a deployment name when room may have appeared there


class ReplicaConnection:
    def __init__(self, ctx: zmq_green.Context, identity: bytes, deployment: str, route: ReplicaRoute,
                 hwm: int, secure: Optional[Secure] = None, clock: Callable[[], float] = time.monotonic,
                 on_capacity: Capacity = lambda deployment: None) -> None:
        self.deployment = deployment
        self.replica_id = route.replica_id
        self.endpoint = route.endpoint
        self.max_ongoing = route.max_ongoing_requests
        self.reported = 0
        self.reported_at = float("-inf")
        self._clock = clock
        self._on_capacity = on_capacity
        self.inflight: dict[str, RequestStream] = {}  # in send order (sent_at grows)
        self.connected = False
        self.down = False
        self.closed = False
        self.retired = False  # left the routing table; closes when its last request is released
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # ZMTP pings: a vanished host -> EVENT_DISCONNECTED
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._monitor.setsockopt(zmq.LINGER, 0)
        if secure is not None:
            secure(sock)  # CURVE client keys, before connect
        sock.connect(self.endpoint)
        self._sock = sock
        self._reader = gevent.spawn(self._read_loop)
        self._watcher = gevent.spawn(self._watch_loop)

    # ----------------------------------------------------------------- request greenlets

    def submit(self, stream: RequestStream, request: GenerateRequest) -> None:
        stream.sent_at = self._clock()
        self.inflight[stream.request_id] = stream
        try:
            self._send(request)
        except ReplicaUnavailable:
            self.inflight.pop(stream.request_id, None)
            raise

    def release(self, stream: RequestStream) -> None:
        """A request is done with this replica: unregister it, and abort it if still running there."""
        if self.inflight.pop(stream.request_id, None) is not None:
            self._on_capacity(self.deployment)
        if not stream.finished and not self.closed:
            try:
                self._send(Abort(request_ids=[stream.request_id]))
                metrics.ABORTS.labels(self.deployment, stream.close_reason or "client_gone").inc()
                log.info("req=%s aborted on replica %s (%s)", stream.request_id, self.replica_id,
                         stream.close_reason)
            except ReplicaUnavailable as exc:
                log.debug("req=%s abort not sent to %s: %s", stream.request_id, self.replica_id, exc)
        if self.retired and not self.inflight:
            self.close("replica %s retired and drained" % self.replica_id)

    def _send(self, msg: object) -> None:
        if self.closed:
            raise ReplicaUnavailable("connection to replica %s is closed" % self.replica_id)
        try:
            self._sock.send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise ReplicaUnavailable("send queue to replica %s is full" % self.replica_id) from None
        except zmq.ZMQError as exc:
            raise ReplicaUnavailable("send to replica %s failed: %s" % (self.replica_id, exc)) from None

    # ----------------------------------------------------------------- reader greenlet

    def _read_loop(self) -> None:
        sock = self._sock
        try:
            while True:
                for _ in range(_DRAIN):
                    try:
                        frames = _recv_queued(sock)
                    except zmq.Again:
                        frames = sock.recv_multipart()  # nothing queued: park until a message arrives
                    self._dispatch(frames)
                gevent.sleep(0)  # _DRAIN messages without parking: let the request greenlets run
        except gevent.GreenletExit:
            pass
        except zmq.ZMQError as exc:
            if not self.closed:
                log.error("replica %s reader stopped: %s", self.replica_id, exc)
                self._mark_down("reader for replica %s stopped: %s" % (self.replica_id, exc))
        except Exception:
            log.exception("replica %s reader crashed", self.replica_id)
            self._mark_down("proxy lost the reader for replica %s" % self.replica_id)

    def _dispatch(self, frames: list[bytes]) -> None:
        try:
            msg = decode_frames(frames)
        except ProtocolError as exc:
            log.warning("replica %s sent a bad message: %s", self.replica_id, exc)
            return
        if isinstance(msg, TokenBatch):
            inflight = self.inflight
            ended = False
            for delta in msg.deltas:
                stream = inflight.get(delta.request_id)
                if stream is None:
                    continue
                sink = stream.sink  # direct writes: RequestStream.push's fast path, inlined (per token)
                if sink is not None and delta.finish_reason is None:
                    if not sink.offer(delta):
                        stream.wake_consumer()
                    continue
                if not stream.push(delta):
                    self._cut_off(stream)
                elif delta.finish_reason is not None:
                    del inflight[delta.request_id]
                    ended = True
            if msg.load is not None:  # a new report renews every worker's share: queued requests retry
                ended = self.report(msg.load, self._clock()) or ended
            if ended:
                self._on_capacity(self.deployment)
        elif isinstance(msg, RequestError):
            stream = self.inflight.pop(msg.request_id, None)
            if stream is not None:
                stream.push(msg)
                self._on_capacity(self.deployment)
        elif isinstance(msg, ReplicaDead):
            log.error("[failover] replica %s says it is dead: %s", self.replica_id, msg.reason)
            self._mark_down("replica %s died: %s" % (self.replica_id, msg.reason))
        else:
            log.warning("replica %s sent unexpected %s", self.replica_id, type(msg).__name__)

    def _cut_off(self, stream: RequestStream) -> None:
        """The client reads too slowly: stop the replica now, then tell the client (when it reads)."""
        del self.inflight[stream.request_id]
        try:
            self._send(Abort(request_ids=[stream.request_id]))
            metrics.ABORTS.labels(self.deployment, "slow_reader").inc()
        except ReplicaUnavailable as exc:
            log.debug("req=%s abort not sent to %s: %s", stream.request_id, self.replica_id, exc)
        log.warning("req=%s client reads too slowly (%d chars pending); aborted on replica %s",
                    stream.request_id, stream.pending, self.replica_id)
        stream.fail(SLOW_READER_STATUS, "the client read the stream too slowly: more than %d characters "
                    "were waiting; the response was cut off" % stream.max_pending, drop_pending=True)

    # ----------------------------------------------------------------- load

    def report(self, load: int, made_at: float) -> bool:
        """Take a load report made at `made_at` unless we hold a newer one; True if taken."""
        if made_at < self.reported_at:
            return False
        self.reported, self.reported_at = load, made_at
        return True

    def table_update(self, route: ReplicaRoute, received_at: float) -> None:
        self.max_ongoing = route.max_ongoing_requests
        self.report(route.running + route.waiting, received_at - TABLE_REPORT_LAG)

    def view(self, allowed: bool = True) -> ReplicaView:
        since = 0
        for stream in reversed(self.inflight.values()):  # newest first: stop at the first older one
            if stream.sent_at <= self.reported_at:
                break
            since += 1
        return ReplicaView(self.replica_id, self.max_ongoing, self.reported, self.reported_at,
                           len(self.inflight), since, self.connected, self.down, allowed)

    # ----------------------------------------------------------------- watcher greenlet

    def _watch_loop(self) -> None:
        try:
            while True:
                event = recv_monitor_message(self._monitor)["event"]
                if event == zmq.EVENT_CONNECTED:
                    if self.down:
                        log.info("[failover] replica %s reconnected at %s", self.replica_id, self.endpoint)
                    self.connected, self.down = True, False
                elif event == zmq.EVENT_DISCONNECTED:
                    self._let_reader_drain()
                    log.warning("[failover] lost connection to replica %s at %s (%d in flight)",
                                self.replica_id, self.endpoint, len(self.inflight))
                    self._mark_down("lost connection to replica %s" % self.replica_id)
        except gevent.GreenletExit:
            pass
        except zmq.ZMQError as exc:
            if not self.closed:
                log.warning("replica %s monitor stopped: %s", self.replica_id, exc)
        except Exception:
            log.exception("replica %s monitor crashed", self.replica_id)

    def _let_reader_drain(self) -> None:
        """Tokens the replica sent just before dying may still sit in the DEALER's queue: let the reader
        deliver them before failing the requests. Reading EVENTS is no recv; on a zmq.green socket it also
        wakes the reader. Bounded, so a flood cannot stall failover."""
        for _ in range(50):
            if not self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            gevent.sleep(0.001)

    # ----------------------------------------------------------------- lifecycle

    def _mark_down(self, message: str) -> None:
        self.connected = False
        self.down = True
        self.fail_all(503, message)
        self._on_capacity(self.deployment)  # queued requests must learn there is one replica fewer

    def fail_all(self, status: int, message: str) -> None:
        streams = list(self.inflight.values())
        self.inflight.clear()
        for stream in streams:
            stream.fail(status, message)
        if streams:
            log.warning("[failover] failed %d in-flight request(s) on replica %s: %s",
                        len(streams), self.replica_id, message)

    def retire(self) -> None:
        """The replica left the routing table: take no new requests, let in-flight ones finish (the
        replica drains them), close once the last one is released. A replica that dies meanwhile is
        still noticed by the monitor; a silent one by the stream's idle timeout."""
        self.retired = True
        if not self.inflight:
            self.close("replica %s left the routing table" % self.replica_id)

    def close(self, reason: str) -> None:
        """Stop the greenlets, fail what is in flight, close both sockets. Idempotent."""
        if self.closed:
            return
        self.closed = True
        gevent.killall([self._reader, self._watcher], block=True, timeout=2)
        self.fail_all(503, reason)
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self._sock.close(linger=0)


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
        self._opened: dict[str, int] = {}  # endpoint -> connections opened to it so far
        self._retired: dict[str, ReplicaConnection] = {}  # left the table, still draining

    def _identity_for(self, endpoint: str) -> bytes:
        """The worker's identity; suffixed when reopening a connection to an endpoint we used before.

        A ROUTER ignores a new peer whose identity it still holds (unless ROUTER_HANDOVER is set), and
        after we close a DEALER the replica may not have noticed yet: a reopened connection with the
        same identity could silently swallow requests.
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
            conn = self._by_id.get(rid)
            if conn is None:
                log.info("connecting to replica %s of %s at %s", rid, deployment, route.endpoint)
                identity = self._identity_for(route.endpoint)
                conn = self._by_id[rid] = ReplicaConnection(self._ctx, identity, deployment, route, self._hwm,
                                                            self._secure, self._clock, self._on_capacity)
            conn.table_update(route, now)
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

    def in_flight(self) -> int:
        return sum(len(c.inflight) for c in list(self._by_id.values()) + list(self._retired.values()))

    def close_all(self) -> None:
        for conn in list(self._by_id.values()) + list(self._retired.values()):
            conn.close("proxy worker is shutting down")
        self._by_id.clear()
        self._retired.clear()
        self._by_deployment = {}
