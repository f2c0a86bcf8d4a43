"""Per-request event queue between a replica's reader greenlet and the request's greenlet.

Runs in proxy workers (gevent); owns no socket. A deque plus a gevent Event: `push` is called by the
reader greenlet (producer), `get`/`drain` only by the request greenlet (single consumer). Both run in the
one OS thread of the worker, so there is no lock: a greenlet switch only happens inside `Event.wait`.

Items are `Delta` (running) or `RequestError` (terminal). A Delta with a finish_reason is terminal too.
Never block in `push`: it runs on the reader greenlet that serves every request on the replica.

Bounded: text waiting for a slow client is counted, each queued delta as its characters plus
ITEM_COST for the object around them (a flood of one-word deltas is mostly that overhead: 1 MiB of
6-character deltas counted as text alone held ~30 MiB), and `push` refuses a delta that would take it
past `max_pending`; the replica connection then aborts the request at the replica and fails the
stream (`fail` always gets through and drops what was pending), so a slow reader costs at most that much
memory, never more.

Direct writes: while the request greenlet is parked with nothing queued it may attach a
`client_sink.ClientSink` (`sink`); `push` then hands each non-final delta to it instead of queueing, and
wakes the consumer only when the sink gives up (partial write, client gone). Terminal items and errors are
always queued, so the consumer (never the reader) ends the response.
"""
from __future__ import annotations

from array import array
from collections import deque
from typing import TYPE_CHECKING, Callable, Optional, Union

from gevent.event import Event

from runtime.protocol import Delta, RequestError

if TYPE_CHECKING:
    from proxy.client_sink import ClientSink

Item = Union[Delta, RequestError]

DEFAULT_MAX_PENDING = 1 << 20
ITEM_COST = 200  # about the bytes a queued Delta takes besides its text (struct, str header, id list)


def is_terminal(item: Item) -> bool:
    return not isinstance(item, Delta) or item.finish_reason is not None


def as_error(item: Item) -> Optional[RequestError]:
    """The failure an item stands for, if any. A replica-side abort counts as one: we never asked."""
    if isinstance(item, RequestError):
        return item
    if item.finish_reason == "abort":
        return RequestError(item.request_id, 503, "request was aborted by the replica", "server_error")
    return None


class RequestStream:
    __slots__ = ("request_id", "replica_id", "finished", "closed", "sent_at", "pending", "max_pending",
                 "sink", "close_reason", "token_ids", "completion_tokens", "lost", "_items", "_event",
                 "_on_close")

    def __init__(self, request_id: str, replica_id: str,
                 on_close: Optional[Callable[["RequestStream"], None]] = None, sent_at: float = 0.0,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.request_id = request_id
        self.replica_id = replica_id
        self.finished = False  # a terminal item was pushed: the replica is done with this request
        self.closed = False
        self.sent_at = sent_at  # when the request was sent to the replica (worker clock)
        self.pending = 0  # queued and not yet taken by the request greenlet: characters + ITEM_COST each
        self.max_pending = max_pending
        self.close_reason = ""  # why it was closed: the abort reason when it had not finished
        self.sink: Optional[ClientSink] = None  # attached only while the consumer waits with nothing queued
        # kept by the replica reader for a resume elsewhere (dispatch.Dispatch.resume): the token ids of
        # every delta received, and the replica's running count of completion tokens
        self.token_ids = array("q")  # 8 bytes an id
        self.completion_tokens = 0
        self.lost = False  # failed because the replica died or its connection was lost (not the request)
        self._items: deque[Item] = deque()
        self._event = Event()
        self._on_close = on_close

    def push(self, item: Item) -> bool:
        """Queue an item; False (nothing queued) when a delta would exceed `max_pending`."""
        if self.finished:  # e.g. a late ReplicaDead after the final delta: first terminal wins
            return True
        sink = self.sink
        if sink is not None:
            if type(item) is Delta and item.finish_reason is None:
                if not sink.offer(item):  # it took the delta but needs the consumer
                    self.wake_consumer()
                return True
            self.sink = None  # a terminal item: the consumer ends the response
        if isinstance(item, Delta):
            size = len(item.text) + ITEM_COST
            if self.pending + size > self.max_pending and self._items:
                return False
            self.pending += size
        if is_terminal(item):
            self.finished = True
        self._items.append(item)
        self._event.set()
        return True

    def wake_consumer(self) -> None:
        """The sink gave up (it took its last delta): detach it and wake the request greenlet."""
        self.sink = None
        self._event.set()

    def fail(self, status: int, message: str, type_: str = "server_error", drop_pending: bool = False,
             lost: bool = False) -> None:
        if lost and not self.finished:
            self.lost = True
        if drop_pending and not self.finished:
            self._items.clear()
            self.pending = 0
        self.push(RequestError(request_id=self.request_id, status=status, message=message, type=type_))

    def get(self, timeout: Optional[float]) -> Optional[Item]:
        """Next item, waiting up to `timeout` seconds; None on timeout, or when an attached sink gave up
        (the caller looks at the sink)."""
        if not self._items:
            self._event.clear()
            if not self._event.wait(timeout) or not self._items:
                return None
        return self._take()

    @property
    def queued(self) -> bool:
        return bool(self._items)

    def drain(self, max_chars: int) -> list[Item]:
        """Items already queued, without waiting, up to about `max_chars` of text (at least one item
        if any is queued), stopping after a terminal one."""
        out: list[Item] = []
        chars = 0
        while self._items:
            nxt = self._items[0]
            size = len(nxt.text) if isinstance(nxt, Delta) else 0
            if out and chars + size > max_chars:
                break
            out.append(self._take())
            chars += size
            if is_terminal(nxt):
                break
        return out

    def _take(self) -> Item:
        item = self._items.popleft()
        if isinstance(item, Delta):
            self.pending -= len(item.text) + ITEM_COST
        return item

    def close(self, reason: str = "client_gone") -> None:
        """Unregister from the replica (and abort it there if unfinished, counted under `reason`).
        Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._on_close is not None:
            self._on_close(self)
