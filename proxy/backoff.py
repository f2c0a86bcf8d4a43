"""Exponential backoff for reconnecting to the head (Lazy Pirate reply timeouts) and for reopening a
replica connection whose handshake failed (proxy/handshake.py).

Pure logic; runs in proxy workers; owns no socket, never sleeps or reads the clock.
"""
from __future__ import annotations


class Backoff:
    """Each `next()` returns the current delay and doubles it, up to `maximum`; `reset()` starts over."""

    def __init__(self, initial: float, maximum: float) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("backoff needs 0 < initial <= maximum, got %r, %r" % (initial, maximum))
        self.initial = initial
        self.maximum = maximum
        self._current = initial
        self.attempts = 0

    def next(self) -> float:
        delay = self._current
        self._current = min(self._current * 2, self.maximum)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self._current = self.initial
        self.attempts = 0
