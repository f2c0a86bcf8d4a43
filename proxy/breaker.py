"""Circuit breaker per replica (per proxy worker): eject a replica that keeps failing, probe it later.

Pure logic; runs in proxy workers; owns no socket and never reads the clock (methods take `now`).

    closed --(`failures` failures in a row)--> open --(cooldown passed)--> half-open
    half-open: one probe request at a time; its success closes the breaker, its failure opens it again
    with the cooldown doubled (up to `max_cooldown`). A probe that never reports (the client left before
    the replica answered) frees the probe slot after one cooldown.

Only failures the replica caused count: it refused (503), died, dropped the connection, or did not
answer in time. A 4xx caused by the request never counts, and neither does a request the client
abandoned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


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
    def current_cooldown(self) -> float:
        return self._current_cooldown

    def state(self, now: float) -> str:
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

    def failure(self, now: float) -> bool:
        """Record a failure; True when this one opened the breaker (ejected the replica)."""
        state = self.state(now)
        if state == HALF_OPEN:
            self._open(now, min(self.max_cooldown, max(self.cooldown, self._current_cooldown * 2)))
            return True
        if state == OPEN:
            return False
        self._streak += 1
        if self._streak >= self.failures:
            self._open(now, self.cooldown)
            return True
        return False

    def _open(self, now: float, cooldown: float) -> None:
        self._opened_at = now
        self._current_cooldown = cooldown
        self._probe_at = None
        self._streak = 0
