"""Per-request event queue between a replica's reader greenlet and the request's greenlet.

Runs in proxy workers (gevent); owns no socket. A deque plus a gevent Event: `push` is called by the
reader greenlet (producer), `get` only by the request greenlet (single consumer). Both run in the one
OS thread of the worker, so there is no lock: a greenlet switch only happens inside `Event.wait`.

Items are `Delta` (running) or `RequestError` (terminal). A Delta with a finish_reason is terminal too.
Never block in `push`: it runs on the reader greenlet that serves every request on the replica.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional, Union

from gevent.event import Event

from runtime.protocol import Delta, RequestError

Item = Union[Delta, RequestError]


def is_terminal(item: Item) -> bool:
    return not isinstance(item, Delta) or item.finish_reason is not None


class RequestStream:
    __slots__ = ("request_id", "replica_id", "finished", "closed", "_items", "_event", "_on_close")

    def __init__(self, request_id: str, replica_id: str,
                 on_close: Optional[Callable[["RequestStream"], None]] = None) -> None:
        self.request_id = request_id
        self.replica_id = replica_id
        self.finished = False  # a terminal item was pushed: the replica is done with this request
        self.closed = False
        self._items: deque[Item] = deque()
        self._event = Event()
        self._on_close = on_close

    def push(self, item: Item) -> None:
        if self.finished:  # e.g. a late ReplicaDead after the final delta: first terminal wins
            return
        if is_terminal(item):
            self.finished = True
        self._items.append(item)
        self._event.set()

    def fail(self, status: int, message: str, type_: str = "server_error") -> None:
        self.push(RequestError(request_id=self.request_id, status=status, message=message, type=type_))

    def get(self, timeout: Optional[float]) -> Optional[Item]:
        """Next item, waiting up to `timeout` seconds; None on timeout."""
        if not self._items:
            self._event.clear()
            if not self._event.wait(timeout):
                return None
        return self._items.popleft()

    def close(self) -> None:
        """Unregister from the replica (and abort it there if unfinished). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._on_close is not None:
            self._on_close(self)
