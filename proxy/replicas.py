"""One proxy worker's connection to one replica (the worker's set of them: replica_pool.ReplicaPool).

Runs in each proxy worker (gevent, after fork). Sockets, per replica:
  * one DEALER connected to the replica's data ROUTER (`ReplicaRoute.endpoint`). All DEALERs of a worker
    share one identity, so a replica sees one peer per worker (a reopened connection to an endpoint gets a
    suffix, see ReplicaPool._identity_for). Its reader greenlet is the only one that recvs on it. Request
    greenlets send GenerateRequest/Abort on it with NOBLOCK: the worker is one OS thread and a NOBLOCK
    send never yields, so each multipart send is atomic with respect to other greenlets (and libzmq keeps
    multipart messages atomic against the HWM).
  * its monitor PAIR (EVENT_HANDSHAKE_SUCCEEDED, EVENT_HANDSHAKE_FAILED_*, EVENT_DISCONNECTED), a
    zmq.green socket owned and read by a watcher greenlet.
  `ReplicaConnection.close` stops both greenlets and then closes both sockets (linger 0).

Connected means the handshake succeeded (with CURVE: the replica's ZAP handler accepted our key), not
TCP connected. A handshake refused (our key is not on the replica's host yet) or broken by a protocol
error is never retried by libzmq: the watcher then replaces the DEALER, its monitor and its reader by
new ones with a new identity, after a backoff (proxy/handshake.py), until one is accepted. Only the
watcher does that; requests in flight on the dead socket are failed `lost` (resumed elsewhere).

The DEALER is a plain pyzmq socket driven by hand, not a zmq.green one, behind proxy/raw_dealer.py's
RawDealer: the one class that relies on pyzmq's backend calls and ZMQ_FD's edges, with the invariant
that every send or EVENTS read outside its reader goes through `poke` (stated there).

Failure handling: ReplicaDead, a lost TCP connection (a replica SIGKILLed says nothing; libzmq heartbeats
catch a vanished host or a frozen process, raw_dealer.LIVENESS_TIMEOUT_MS) and leaving the routing table
all fail every in-flight request on that replica, marked `lost` so the request's Dispatch resumes it on
another replica (the reader keeps each stream's token ids for that: `RequestStream.token_ids`).
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

import itertools
import logging
import time
from typing import Callable, Optional

import gevent
import zmq
import zmq.green as zmq_green
from zmq.utils.monitor import recv_monitor_message

from proxy import metrics
from proxy.handshake import FAILED_EVENTS, REOPEN_INITIAL_S, REOPEN_MAX_S, Handshakes
from proxy.raw_dealer import RawDealer, Secure
from proxy.router import ReplicaView
from proxy.streams import RequestStream
from runtime.protocol import (
    KEY_REFUSED, SHUTTING_DOWN, Abort, GenerateRequest, ProtocolError, ReplicaDead, ReplicaRoute, RequestError,
    TokenBatch, decode_frames, encode,
)

log = logging.getLogger(__name__)

_MONITOR_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_monitor_ids = itertools.count(1)
TABLE_REPORT_LAG = 1.0  # seconds a load in the routing table may be older than the table itself
SLOW_READER_STATUS = 408  # status (metrics, logs) of a stream cut off because the client read too slowly


def _suffixed(identity: bytes) -> Callable[[], bytes]:
    counter = itertools.count(1)
    return lambda: identity + b"~%d" % next(counter)


class ReplicaUnavailable(Exception):
    """Sending to the replica failed (socket closed, or its send queue is full)."""


Capacity = Callable[[str], None]  # called with a deployment name when room may have appeared there


class ReplicaConnection:
    def __init__(self, ctx: zmq_green.Context, identity: bytes, deployment: str, route: ReplicaRoute,
                 hwm: int, secure: Optional[Secure] = None, clock: Callable[[], float] = time.monotonic,
                 on_capacity: Capacity = lambda deployment: None,
                 new_identity: Optional[Callable[[], bytes]] = None) -> None:
        """`new_identity` names each DEALER that replaces one whose handshake failed for good
        (ReplicaPool._identity_for; default: `identity` with a counter)."""
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
        self.draining = False  # it said it is shutting down (protocol.SHUTTING_DOWN): no new requests
        # it refused this proxy's key on an open connection (a key revoked since it was accepted): not
        # reachable for /ready until a new handshake succeeds or it sends a token
        self.key_refused = False
        self._ctx, self._hwm, self._secure = ctx, hwm, secure
        self._new_identity = new_identity or _suffixed(identity)
        self._handshakes = Handshakes()
        self._open(identity)
        self._watcher = gevent.spawn(self._watch_loop)

    def _open(self, identity: bytes) -> None:
        """A new DEALER with its monitor and reader. The monitor PAIR connects first (inproc allows
        that), so not even the first handshake's event can be missed."""
        monitor_addr = "inproc://tokenrelay-replica-monitor-%d" % next(_monitor_ids)
        self._monitor = self._ctx.socket(zmq.PAIR)  # green: its watcher greenlet blocks on it
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._monitor.connect(monitor_addr)
        try:
            self._dealer = RawDealer(self._ctx, identity, self.endpoint, self._hwm,
                                     (monitor_addr, _MONITOR_EVENTS), self._secure)
        except BaseException:  # e.g. an endpoint libzmq refuses: no socket may outlive the failed open
            self._monitor.close(linger=0)
            raise
        self._reader = gevent.spawn(self._read_loop)

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
        if (not stream.finished or stream.lost) and not self.closed:
            # a lost replica may come back (thawed, reconnected) still generating a request that moved on
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
        type_byte, payload = encode(msg)
        try:
            self._dealer.send(type_byte, payload)
        except zmq.Again:
            raise ReplicaUnavailable("send queue to replica %s is full" % self.replica_id) from None
        except zmq.ZMQError as exc:
            raise ReplicaUnavailable("send to replica %s failed: %s" % (self.replica_id, exc)) from None

    def _poke(self) -> bool:
        """Wake the reader if a message is queued (RawDealer.poke); True if one is."""
        return not self.closed and self._dealer.poke()

    # ----------------------------------------------------------------- reader greenlet

    def _read_loop(self) -> None:
        """Read until the connection closes. A bug met while handling a message fails the requests in
        flight here (their state is unknown) and reading goes on; a socket error ends the reader and
        marks the replica down. On the way out the FD watcher stops: nobody would clear its signal, and a
        level-triggered watcher on a signalled FD would spin the worker's loop."""
        try:
            while True:
                try:
                    self._dealer.drain(self._dispatch)
                except (gevent.GreenletExit, zmq.ZMQError):
                    raise
                except Exception:
                    log.exception("replica %s: handling a message failed; failing its requests in flight",
                                  self.replica_id)
                    self.fail_all(503, "proxy error while reading from replica %s" % self.replica_id)
                    self._on_capacity(self.deployment)
        except gevent.GreenletExit:
            pass
        except zmq.ZMQError as exc:
            if not self.closed:
                log.error("replica %s reader stopped: %s", self.replica_id, exc)
                self._mark_down("reader for replica %s stopped: %s" % (self.replica_id, exc))
        finally:
            self._dealer.stop_watching()

    def _dispatch(self, frames: list[bytes]) -> None:
        try:
            msg = decode_frames(frames)
        except ProtocolError as exc:
            log.warning("replica %s sent a bad message: %s", self.replica_id, exc)
            return
        if isinstance(msg, TokenBatch):
            self.key_refused = False  # it answers us
            inflight = self.inflight
            ended = False
            for delta in msg.deltas:
                stream = inflight.get(delta.request_id)
                if stream is None:
                    continue
                stream.token_ids.extend(delta.token_ids)  # kept for a resume elsewhere if this replica is lost
                stream.completion_tokens = delta.completion_tokens
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
            if msg.type == SHUTTING_DOWN and not self.draining:
                log.info("[failover] replica %s is shutting down; no new requests go there", self.replica_id)
                self.draining = True  # it refuses new requests: stop choosing it (not a failure)
            elif msg.type == KEY_REFUSED and not self.key_refused:
                # ask again: the replica's ZAP judges a new handshake by its registry as it is now, so a
                # revoked key fails it (the connection goes down, and the backoff reopens try until the
                # key is accepted again) with no client request needed to find out
                self.key_refused = True
                log.warning("[auth] replica %s refused this proxy's key; reconnecting to be judged again",
                            self.replica_id)
                self._dealer.reconnect()
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

    @property
    def reachable(self) -> bool:
        """Connected, not seen dying, and not refusing this proxy's key."""
        return self.connected and not self.down and not self.key_refused

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
        """Reads the current DEALER's monitor (`_reopen` replaces both, from this greenlet)."""
        try:
            while True:
                msg = recv_monitor_message(self._monitor)
                event = msg["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # not EVENT_CONNECTED: TCP alone is not enough
                    self._handshake_succeeded()
                elif event == zmq.EVENT_DISCONNECTED:
                    if self.connected:
                        self._let_reader_drain()
                        log.warning("[failover] lost connection to replica %s at %s (%d in flight)",
                                    self.replica_id, self.endpoint, len(self.inflight))
                    if not self.down or self.inflight:  # after a failed handshake: marked down already
                        self._mark_down("lost connection to replica %s" % self.replica_id)
                elif event in FAILED_EVENTS:
                    self._handshake_failed(event, msg["value"])
        except gevent.GreenletExit:
            pass
        except zmq.ZMQError as exc:
            if not self.closed:
                log.warning("replica %s monitor stopped: %s", self.replica_id, exc)
        except Exception:
            log.exception("replica %s monitor crashed", self.replica_id)

    def _handshake_succeeded(self) -> None:
        failures = self._handshakes.succeeded()
        if failures:
            log.info("[failover] replica %s at %s accepted this proxy after %d failed handshake(s)",
                     self.replica_id, self.endpoint, failures)
        elif self.down:
            log.info("[failover] replica %s reconnected at %s", self.replica_id, self.endpoint)
        self.connected, self.down, self.draining, self.key_refused = True, False, False, False
        self._on_capacity(self.deployment)  # requests waiting for a usable replica retry

    def _handshake_failed(self, event: int, value: int) -> None:
        """Not routable until a handshake succeeds. After a refusal or a protocol error libzmq never
        tries again: wait (backoff), then replace the DEALER, so a key copied to the replica's host later
        is picked up without a restart."""
        failure = self._handshakes.failed(event, value)
        metrics.HANDSHAKE_FAILURES.labels(self.deployment, failure.kind).inc()
        if failure.warn:
            log.warning("replica %s at %s %s; %s", self.replica_id, self.endpoint, failure.reason,
                        "retrying" if failure.reopen_in is None else
                        "retrying with a new connection every %.1f-%.0fs" % (REOPEN_INITIAL_S, REOPEN_MAX_S))
        if not self.down or self.inflight:  # requests queued while it was connecting move elsewhere
            self._mark_down("handshake with replica %s failed (%s)" % (self.replica_id, failure.kind))
        if failure.reopen_in is not None:
            gevent.sleep(failure.reopen_in)
            self._reopen()

    def _reopen(self) -> None:
        """Replace the dead DEALER, its monitor and its reader by new ones with a new identity. Called by
        the watcher; `close` may run while the old reader is being stopped, and then cleans up the old
        sockets itself (they are still the current ones)."""
        self._reader.kill(block=True)
        if self.closed:
            return
        self.fail_all(503, "connection to replica %s is being reopened" % self.replica_id, lost=True)
        self._dealer.close()
        self._monitor.close(linger=0)
        self._open(self._new_identity())
        log.debug("replica %s: reopened the connection to %s", self.replica_id, self.endpoint)

    def _let_reader_drain(self) -> None:
        """Tokens the replica sent just before dying may still sit in the DEALER's queue: let the reader
        deliver them before failing the requests (`_poke` wakes it). Bounded, so a flood cannot stall
        failover."""
        for _ in range(50):
            if not self._poke():
                return
            gevent.sleep(0.001)

    # ----------------------------------------------------------------- lifecycle

    def _mark_down(self, message: str) -> None:
        self.connected = False
        self.down = True
        self.fail_all(503, message, lost=True)
        self._on_capacity(self.deployment)  # queued requests must learn there is one replica fewer

    def fail_all(self, status: int, message: str, lost: bool = False) -> None:
        """Fail every request in flight here; `lost`: the replica (or the way to it) is gone, so they may
        be resumed elsewhere (dispatch.Dispatch.resume)."""
        streams = list(self.inflight.values())
        self.inflight.clear()
        for stream in streams:
            stream.fail(status, message, lost=lost)
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
        self.fail_all(503, reason, lost=True)
        self._dealer.close()
        self._monitor.close(linger=0)
