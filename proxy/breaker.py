"""Circuit breaker per replica (per proxy worker): eject a replica that keeps failing, probe it later.

Pure logic; runs in proxy workers; owns no socket and never reads the clock (methods take `now`).

    closed --(`failures` failures in a row)--> open --(cooldown passed)--> half-open
    half-open: one probe request at a time; its success closes the breaker, its failure opens it again
    with the cooldown doubled (up to `max_cooldown`). A probe that never reports (the client left before
    the replica answered) frees the probe slot after one cooldown.

Only failures the replica caused count: it refused (503), died, dropped the connection, or did not
answer in time. A 4xx caused by the request never counts, and neither does a request the client
abandoned or a replica that refused or stopped it because it is shutting down (protocol.SHUTTING_DOWN).

`Breakers` holds one worker's breakers, one per replica *incarnation* (replica id and endpoint: a restarted
replica process binds a new port, so it starts with a clean breaker), and caps ejection: a breaker does
not open while `max_share` of its deployment's replicas are already ejected (open or half-open), so a
fault that hits every replica at once (a lost agent, a network blip) can never eject them all; those
that are really gone are avoided anyway (down, or out of the routing table).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Optional

from runtime.protocol import StrEnum

class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN  # the names callers import


@dataclass
class Breaker:
    failures: int = 5
    cooldown: float = 5.0
    max_cooldown: float = 60.0
    _streak: int = 0
    _opened_at: Optional[float] = None
    _current_cooldown: float = 0.0
    _probe_at: Optional[float] = None

    @property
    def streak(self) -> int:
        return self._streak

    @property
    def current_cooldown(self) -> float:
        return self._current_cooldown

    def state(self, now: float) -> BreakerState:
        if self._opened_at is None:
            return CLOSED
        if now - self._opened_at < self._current_cooldown:
            return OPEN
        return HALF_OPEN

    def allow(self, now: float) -> bool:
        """May a request go to this replica now?"""
        state = self.state(now)
        if state == CLOSED:
            return True
        if state == OPEN:
            return False
        return self._probe_at is None or now - self._probe_at >= self._current_cooldown

    def on_send(self, now: float) -> bool:
        """A request is sent; True when it is the half-open probe."""
        if self.state(now) == HALF_OPEN and self.allow(now):
            self._probe_at = now
            return True
        return False

    def success(self, now: float) -> None:
        self._streak = 0
        self._opened_at = None
        self._probe_at = None
        self._current_cooldown = 0.0

    def failure(self, now: float, may_open: bool = True) -> bool:
        """Record a failure; True when this one opened the breaker (ejected the replica). With
        `may_open` False a closed breaker stays closed (the streak is kept: the next failure may open it)."""
        state = self.state(now)
        if state == HALF_OPEN:
            self._open(now, min(self.max_cooldown, max(self.cooldown, self._current_cooldown * 2)))
            return True
        if state == OPEN:
            return False
        self._streak += 1
        if self._streak >= self.failures and may_open:
            self._open(now, self.cooldown)
            return True
        return False

    def _open(self, now: float, cooldown: float) -> None:
        self._opened_at = now
        self._current_cooldown = cooldown
        self._probe_at = None
        self._streak = 0


class Breakers:
    """The breakers of one proxy worker, one per replica incarnation, with the ejection cap."""

    def __init__(self, failures: int, cooldown: float, max_share: float = 0.5) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.max_share = max_share
        self._by_key: dict[Hashable, Breaker] = {}

    def get(self, key: Hashable) -> Breaker:
        b = self._by_key.get(key)
        if b is None:
            b = self._by_key[key] = Breaker(self.failures, self.cooldown)
        return b

    def failure(self, key: Hashable, deployment: Iterable[Hashable], now: float) -> tuple[bool, bool]:
        """Record a failure of `key`, one of `deployment`'s replicas. Returns (ejected now, held back by
        the cap: it would have been ejected, but `max_share` of the deployment already is)."""
        peers = list(deployment)
        breaker = self.get(key)
        if breaker.state(now) != CLOSED:
            return breaker.failure(now), False
        ejected = sum(1 for k in peers if k != key and k in self._by_key
                      and self._by_key[k].state(now) != CLOSED)
        may_open = ejected + 1 <= math.floor(self.max_share * max(len(peers), 1) + 1e-9)
        opened = breaker.failure(now, may_open)
        return opened, not may_open and breaker.state(now) == CLOSED and breaker.streak >= self.failures

    def forget_except(self, live: Iterable[Hashable]) -> None:
        """Drop the breakers of incarnations no longer in use."""
        keep = set(live)
        self._by_key = {k: v for k, v in self._by_key.items() if k in keep}

    def __len__(self) -> int:
        return len(self._by_key)
