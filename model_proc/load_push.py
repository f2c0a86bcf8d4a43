"""Telling every proxy worker the replica's load: which workers to tell, and when.

Runs in model_proc's asyncio loop; owns no socket (the replica server sends what this decides). Every
TokenBatch carries the replica's load (requests it holds), so a worker that gets tokens knows it. A
worker that gets none (it has no request here) would admit against the head's table, up to a second
old; so when the load changes, each known worker whose last message said another load gets an empty
TokenBatch with the new one, at most every LOAD_PUSH_INTERVAL (a burst of arrivals is one push).
"""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

LOAD_PUSH_INTERVAL = 0.025  # seconds between load pushes to every proxy worker (only when it changed)


class LoadPush:
    """Which proxy workers have heard which load. `send(peer, load)` sends the empty TokenBatch."""

    def __init__(self, load: Callable[[], int], send: Callable[[bytes, int], None]) -> None:
        self._load = load
        self._send = send
        self.peers: set[bytes] = set()  # every proxy worker that sent us something and is not gone
        self._told: dict[bytes, int] = {}  # the load each worker was last sent (batch or push)
        self._pushed_at = float("-inf")
        self._handle: Optional[asyncio.TimerHandle] = None

    def told(self, peer: bytes, load: int) -> None:
        """A message with this load went to this worker."""
        self._told[peer] = load

    def forget(self, peer: bytes) -> None:
        self.peers.discard(peer)
        self._told.pop(peer, None)

    def changed(self) -> None:
        """The load may have changed: schedule a push to the workers not told it, no sooner than
        LOAD_PUSH_INTERVAL after the last push."""
        if self._handle is not None or not self._untold(self._load()):
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._pushed_at + LOAD_PUSH_INTERVAL - loop.time())
        self._handle = loop.call_later(delay, self._push)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _untold(self, load: int) -> list[bytes]:
        return [peer for peer in self.peers if self._told.get(peer) != load]

    def _push(self) -> None:
        self._handle = None
        load = self._load()
        untold = self._untold(load)
        if not untold:
            return
        self._pushed_at = asyncio.get_running_loop().time()
        for peer in untold:
            self._told[peer] = load
            self._send(peer, load)  # may fail and forget the peer: the list above is a copy
