"""Routing-table subscriber: keeps one worker's TableState and ReplicaPool in step with the head.

Runs as one greenlet in each proxy worker. Owns two zmq.green sockets, both used only by this greenlet:
  * DEALER to the head control ROUTER (`--head`): HeadHello -> HeadInfo, SnapshotRequest -> RoutingTable,
    ScaleDemand (no reply: requests wait for a scaled-to-zero deployment; queued by `note_demand`)
  * SUB to HeadInfo.publish_endpoint, topic TABLE_TOPIC: frames [b"table", type byte, RoutingTable]

Protocol (zguide Clone + Lazy Pirate, with epoch and gap detection):
  1. HeadHello on a fresh DEALER; no HeadInfo within the timeout -> close the DEALER, open a new one, retry
     with exponential backoff (Lazy Pirate).
  2. Connect the SUB first, then send SnapshotRequest; apply tables from either socket through
     TableState (see table_state.py); an epoch change or a version gap asks for a new snapshot.
  3. When the table goes stale (the head republishes at least every second), log once and start over at
     step 1 — the head may have restarted on a new publish endpoint. Routing keeps the last table.
Must never stop routing because the head is away, and never let an exception end the greenlet.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Literal, Optional

import gevent
import zmq
import zmq.green as zmq_green

from proxy.backoff import Backoff
from proxy.replica_pool import ReplicaPool
from proxy.replicas import Secure
from proxy.table_state import TableState
from runtime.protocol import (
    PROTOCOL_VERSION, TABLE_TOPIC, ControlReply, HeadHello, HeadInfo, ProtocolError, RoutingTable,
    ScaleDemand, SnapshotRequest, decode_frames, encode,
)

log = logging.getLogger(__name__)

TICK = 0.25  # seconds between staleness checks when nothing arrives
Awaiting = Literal["hello", "snapshot"]  # the head reply a subscriber is waiting for


def connectable_endpoint(publish: str, head: str) -> str:
    """The head may report its PUB bind address (tcp://0.0.0.0:P or tcp://*:P): use the head's host then."""
    scheme, sep, rest = publish.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme == "tcp" and sep and colon and host in ("*", "0.0.0.0", "[::]", "::"):
        head_host = head.partition("://")[2].rpartition(":")[0]
        if head_host:
            return "tcp://%s:%s" % (head_host, port)
    return publish


class TableSubscriber:
    def __init__(self, ctx: zmq_green.Context, head: str, state: TableState, pool: ReplicaPool,
                 timeout: float, timeout_max: float, clock: Callable[[], float] = time.monotonic,
                 on_tick: Optional[Callable[[float], None]] = None, secure: Optional[Secure] = None,
                 http_endpoint: str = "",
                 on_table: Optional[Callable[[dict[str, int]], None]] = None) -> None:
        self._ctx = ctx
        self._http_endpoint = http_endpoint  # announced in HeadHello: the head lists it for Prometheus
        self._secure = secure
        self._head = head
        self._state = state
        self._pool = pool
        self._clock = clock
        self._on_tick = on_tick
        self._on_table = on_table  # called with {deployment: replicas} after each table is applied
        self._backoff = Backoff(timeout, timeout_max)
        self._snapshot_timeout = timeout_max
        self._dealer: Optional[zmq_green.Socket] = None
        self._sub: Optional[zmq_green.Socket] = None
        self._sub_endpoint = ""
        self._poller = zmq_green.Poller()
        self._awaiting: Optional[Awaiting] = None  # the reply this worker waits for, if any
        self._deadline = 0.0
        self._sent_at = 0.0
        self._hello_at = float("-inf")
        self._epoch: Optional[int] = None
        self._demand: dict[str, int] = {}  # deployment -> requests waiting, sent at the next step

    def note_demand(self, deployment: str, waiting: int) -> None:
        """Tell the head (at this greenlet's next step) that requests wait for a replica of `deployment`;
        callers rate-limit (gateway: once a second per deployment)."""
        self._demand[deployment] = waiting

    def run(self) -> None:
        log.info("[startup] routing-table subscriber for head %s", self._head)
        try:
            while True:
                try:
                    if self._dealer is None:
                        self._start_hello(self._clock())
                    self._step()
                except gevent.GreenletExit:
                    raise
                except Exception:
                    log.exception("routing-table subscriber step failed; reconnecting to the head")
                    self._close_dealer()  # the next iteration starts over with HeadHello
                    gevent.sleep(self._backoff.next())
        except gevent.GreenletExit:
            pass
        finally:
            self._close_dealer()
            self._close_sub()

    # ----------------------------------------------------------------- one loop iteration

    def _step(self) -> None:
        now = self._clock()
        timeout = TICK if self._awaiting is None else max(0.0, min(TICK, self._deadline - now))
        events = dict(self._poller.poll(math.ceil(timeout * 1000)))  # int() would spin the last ms
        if self._sub is not None and self._sub in events:
            self._drain(self._sub)
        if self._dealer is not None and self._dealer in events:
            self._drain(self._dealer)
        self._send_demand()
        now = self._clock()
        if self._awaiting is not None and now >= self._deadline:
            # Warn on the first miss and then every 10th, so a long head outage is not a log flood.
            misses = self._backoff.attempts
            log.log(logging.WARNING if misses <= 1 or misses % 10 == 0 else logging.DEBUG,
                    "no %s reply from head %s within %.1fs (attempt %d); retrying with a new socket",
                    self._awaiting, self._head, self._deadline - self._sent_at, misses)
            self._start_hello(now)
        elif self._awaiting is None and self._state.is_stale(now) and now - self._hello_at > self._state.stale_after:
            self._start_hello(now)
        change = self._state.staleness_change(now)
        table = self._state.table
        if change == "stale" and table is not None:
            log.warning("routing table stale: nothing from head %s for %.1fs; still routing with epoch %d "
                        "version %d", self._head, self._state.age(now) or 0.0, table.epoch, table.version)
        elif change == "fresh" and table is not None:
            log.info("routing table fresh again (epoch %d version %d)", table.epoch, table.version)
        if self._on_tick is not None:
            self._on_tick(self._state.age(now) or 0.0)

    def _drain(self, sock: zmq_green.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode_frames(frames)
            except ProtocolError as exc:
                log.warning("bad message from head: %s", exc)
                continue
            if isinstance(msg, RoutingTable):
                if sock is self._dealer and self._awaiting == "snapshot":
                    self._awaiting = None
                    self._backoff.reset()
                self._offer(msg)
            elif isinstance(msg, HeadInfo) and sock is self._dealer:
                self._on_info(msg)
            elif isinstance(msg, ControlReply) and msg.code == "recovering" and self._awaiting == "snapshot":
                # a head that is starting waits for its agents before it has a table: it publishes one
                # on the SUB when ready; no snapshot is due, and the staleness check asks again later
                log.info("[startup] head %s is starting; its routing table follows", self._head)
                self._awaiting = None
                self._backoff.reset()
            elif isinstance(msg, ControlReply) and not msg.ok:
                log.warning("head %s refused a message: %s %s", self._head, msg.code, msg.message)
            else:
                log.warning("unexpected %s from head", type(msg).__name__)

    def _offer(self, table: RoutingTable) -> None:
        offer = self._state.offer(table, self._clock())
        if offer.applied:
            level = {"next": logging.DEBUG, "gap": logging.WARNING}.get(offer.reason, logging.INFO)
            log.log(level, "routing table epoch %d version %d applied (%s): %d deployment(s), %d replica(s)",
                    table.epoch, table.version, offer.reason, len(table.deployments),
                    sum(len(d.replicas) for d in table.deployments))
            self._pool.sync(table)
            if self._on_table is not None:
                self._on_table({d.name: len(d.replicas) for d in table.deployments})
        elif offer.reason == "republish":
            self._pool.refresh(table)  # the same loads, still current: keeps their reports fresh
        if offer.resync and self._awaiting is None:
            self._request_snapshot()

    # ----------------------------------------------------------------- handshake

    def _on_info(self, info: HeadInfo) -> None:
        if self._awaiting != "hello":
            return  # a late reply from an earlier attempt
        if info.protocol != PROTOCOL_VERSION:
            log.error("head %s speaks protocol %d, this proxy %d; will retry", self._head, info.protocol,
                      PROTOCOL_VERSION)
            return  # the deadline passes and we retry with backoff
        if self._epoch != info.epoch:
            log.info("[startup] head %s epoch %d publishes on %s", self._head, info.epoch, info.publish_endpoint)
            self._epoch = info.epoch
        endpoint = connectable_endpoint(info.publish_endpoint, self._head)
        if endpoint != self._sub_endpoint:
            self._open_sub(endpoint)
        self._request_snapshot()

    def _start_hello(self, now: float) -> None:
        self._close_dealer()
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if self._secure is not None:
            self._secure(dealer)
        dealer.connect(self._head)
        self._dealer = dealer
        self._poller.register(dealer, zmq.POLLIN)
        hello = HeadHello(protocol=PROTOCOL_VERSION, role="proxy", http_endpoint=self._http_endpoint)
        dealer.send_multipart(encode(hello), flags=zmq.NOBLOCK)
        self._await("hello", now, self._backoff.next())
        self._hello_at = now

    def _send_demand(self) -> None:
        demand, self._demand = self._demand, {}
        for deployment, waiting in demand.items():
            if self._dealer is None:
                return  # dropped: the gateway notes it again within a second while requests wait
            try:
                self._dealer.send_multipart(encode(ScaleDemand(deployment, waiting)), flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("scale demand for %s to head %s not sent (queue full)", deployment, self._head)

    def _request_snapshot(self) -> None:
        if self._dealer is None:
            return
        try:
            self._dealer.send_multipart(encode(SnapshotRequest(protocol=PROTOCOL_VERSION)), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("snapshot request to head %s not sent (queue full)", self._head)
            return
        self._await("snapshot", self._clock(), self._snapshot_timeout)

    def _await(self, what: Awaiting, now: float, timeout: float) -> None:
        self._awaiting = what
        self._sent_at = now
        self._deadline = now + timeout

    # ----------------------------------------------------------------- sockets

    def _open_sub(self, endpoint: str) -> None:
        self._close_sub()
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 1000)
        sub.setsockopt(zmq.SUBSCRIBE, TABLE_TOPIC)
        if self._secure is not None:
            self._secure(sub)
        sub.connect(endpoint)
        self._sub = sub
        self._sub_endpoint = endpoint
        self._poller.register(sub, zmq.POLLIN)

    def _close_dealer(self) -> None:
        if self._dealer is not None:
            self._poller.unregister(self._dealer)
            self._dealer.close(linger=0)
            self._dealer = None

    def _close_sub(self) -> None:
        if self._sub is not None:
            self._poller.unregister(self._sub)
            self._sub.close(linger=0)
            self._sub = None
            self._sub_endpoint = ""
