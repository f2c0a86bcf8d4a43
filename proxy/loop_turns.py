"""Giving the other greenlets of a proxy worker their turn while one greenlet has work ready.

Runs in proxy workers (gevent); owns no socket. A greenlet whose input is all there (a fast upload,
pipelined requests, a body of tiny chunks) never blocks, so it must yield by itself. `gevent.sleep(0)`
is not enough: it only queues a callback, and gevent's hub checks the time, and so polls I/O, once per
50 callbacks (CALLBACK_CHECK_COUNT); greenlets waiting for I/O (every stream's replica reader) waited
for up to 50 turns of the busy one: 50 five-millisecond reads of a chunked body (0.26 s), 50 parses of
a 785 KB request head (a stream stalled 0.7 s). A sleep with a timer ends only after the loop's next
poll; it costs up to 1 ms when nothing else is ready (libev's shortest wait), so it is taken only when
the loop last polled POLL_EVERY ago. When that was is the loop's cached time (`loop.now()`, which libev
updates after each poll), so knowing it costs nothing per loop round (a check watcher did: a Python
call per round, thousands a second at 1,000 streams).

Must never be called outside a greenlet of a gevent worker (the timer needs the hub).
"""
from __future__ import annotations

import time
from typing import Callable

import gevent

POLL_EVERY = 0.005  # seconds of one greenlet's uninterrupted work before the loop polls I/O
POLL_SLEEP = 0.0001  # any timer > 0 makes the loop poll before this greenlet runs again


class LoopTurns:
    """Turn-taking for one worker process. `clock` must read the same clock as the loop's cached time
    (libev's: wall time)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def take(self) -> None:
        """Yield to the other greenlets; and to the loop's I/O poll when it last ran POLL_EVERY ago."""
        since_poll = self._clock() - gevent.get_hub().loop.now()
        gevent.sleep(POLL_SLEEP if since_poll >= POLL_EVERY else 0)


TURNS = LoopTurns()
