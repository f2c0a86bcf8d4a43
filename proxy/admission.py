"""Admission control: the bounded per-deployment wait queue of one proxy worker, and its decisions.

Pure logic; runs in proxy workers; owns no socket, never reads the clock (methods take `now`) and never
blocks: the request greenlet waits on its Ticket's `wake` callable's event (dispatch.py does the waiting).

When every usable replica of a deployment is full (router FULL), a request takes a ticket and waits
for room, first in first out, at most `timeout` seconds; then it is rejected with 429. A full queue
rejects at once (429). No usable replica at all is 503. The queue holds at most `size` tickets per
worker and deployment, so nothing here grows without bound. Only the ticket at the head of the queue
tries to route; when it is admitted (or leaves) the next one is woken, since there may be more room.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from proxy.router import DOWN, FULL, NONE, ROUTE
from runtime.protocol import StrEnum

class Verdict(StrEnum):
    ADMIT = "admit"
    WAIT = "wait"
    REJECT_FULL = "reject_full"  # 429: the queue is full (or waiting is not allowed)
    REJECT_TIMEOUT = "reject_timeout"  # 429: waited the whole queue timeout
    REJECT_NONE = "reject_none"  # 503: no usable replica


# the names callers import
ADMIT, WAIT, REJECT_FULL, REJECT_TIMEOUT, REJECT_NONE = (
    Verdict.ADMIT, Verdict.WAIT, Verdict.REJECT_FULL, Verdict.REJECT_TIMEOUT, Verdict.REJECT_NONE)


@dataclass(eq=False)
class Ticket:
    seq: int
    deadline: float
    wake: Callable[[], None] = lambda: None
    gone: bool = False


@dataclass
class AdmissionQueue:
    size: int
    timeout: float
    _tickets: deque[Ticket] = field(default_factory=deque)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return len(self._tickets)

    def join(self, now: float, wake: Callable[[], None] = lambda: None) -> Optional[Ticket]:
        """A ticket at the back of the queue, or None when the queue is full."""
        if len(self._tickets) >= self.size or self.timeout <= 0:
            return None
        ticket = Ticket(next(self._seq), now + self.timeout, wake)
        self._tickets.append(ticket)
        return ticket

    def is_first(self, ticket: Ticket) -> bool:
        return bool(self._tickets) and self._tickets[0] is ticket

    def leave(self, ticket: Ticket) -> None:
        """Remove a ticket (admitted, timed out or client gone) and wake whoever is now first."""
        if ticket.gone:
            return
        ticket.gone = True
        was_first = self.is_first(ticket)
        try:
            self._tickets.remove(ticket)
        except ValueError:
            pass
        if was_first:
            self.wake_first()

    def wake_first(self) -> None:
        if self._tickets:
            self._tickets[0].wake()

    def resize(self, size: int, timeout: float) -> None:
        """New settings from the routing table; tickets already waiting keep their deadline."""
        self.size, self.timeout = size, timeout


def decide(outcome: str, ticket: Optional[Ticket], queue: AdmissionQueue, now: float) -> Verdict:
    """What a request does after the router answered `outcome`, an Outcome (ticket: the one it holds, if
    any)."""
    if outcome == ROUTE:
        return ADMIT
    if outcome == NONE:
        return REJECT_NONE
    assert outcome in (FULL, DOWN), outcome  # DOWN: wait for a replica to come back, as for room
    if ticket is None:
        return WAIT if len(queue) < queue.size and queue.timeout > 0 else REJECT_FULL
    if now >= ticket.deadline:
        return REJECT_TIMEOUT
    return WAIT


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, int(seconds + 0.999)))
