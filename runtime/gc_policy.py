"""Garbage collection in the serving processes: the start-up heap frozen, full collections rare, and the
pause of every collection measured.

Called once per process when it is ready to serve: by each proxy worker after its gateway started
(proxy/server.py) and by each replica once its engine is ready (model_proc/server.py). No sockets, no
event loop; touches only the interpreter's `gc` module.

Why (scale1000, one proxy worker, 1,000 streams): the worker's tracked heap held ~117,000 objects, about
45,000 of them from start-up (modules, gunicorn/falcon/gevent/zmq state) and most of the rest from the
streams in flight. CPython's full (generation 2) collection walks all of them: 20-90 ms of CPU in the
worker, about every 10 s, during which no stream gets a token. With 50 ms between tokens that is a p99
event for both TTFT and inter-token latency. Two changes:
- `freeze_heap` collects once and then `gc.freeze()`s what is left: the start-up objects move to the
  permanent generation that no collection walks (`vllm serve` does the same after start-up,
  vllm.utils.gc_utils.freeze_gc_heap, so a replica's engine process behaves as it does there).
- `rare_full_collections` raises CPython's third threshold from 10 to FULL_COLLECTION_EVERY: a full
  collection after that many generation-1 collections (about every 10 minutes at 1,000 streams instead
  of every 10 s). Young collections, which find almost all cyclic garbage, are unchanged, so memory
  stays bounded: what reaches generation 2 and then becomes cyclic garbage (about 15 objects a second
  at 1,000 streams) waits longer to be freed.

`GcPauses` times every collection (gc.callbacks) so the proxy can export them
(tokenrelay_proxy_gc_pause_seconds) and a benchmark can tell a GC pause from other latency. Its callback
must not take locks or switch greenlets: it only appends to a list that `drain` hands over.
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

FULL_COLLECTION_EVERY = 1000  # generation-1 collections between two full ones (CPython's default: 10)
MAX_PENDING = 4096  # pauses kept between two drains; past it the oldest half is dropped


def freeze_heap() -> int:
    """Collect every generation, then exclude the surviving objects from all later collections. Returns
    how many objects were frozen (gc.get_freeze_count())."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def rare_full_collections() -> tuple[int, int, int]:
    """Keep the young-generation thresholds, make full collections FULL_COLLECTION_EVERY generation-1
    collections apart. Returns the new thresholds."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
    return gc.get_threshold()


def prepare_to_serve(role: str) -> None:
    """Both of the above, logged once: call when the process is ready and before it serves."""
    frozen = freeze_heap()
    thresholds = rare_full_collections()
    log.info("[startup] %s: %d start-up objects frozen out of garbage collection, thresholds %s",
             role, frozen, thresholds)


class GcPauses:
    """The pause (wall-clock seconds) of every garbage collection in this process, by generation, kept
    until `drain`. `install` registers the gc callback, `uninstall` removes it."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0
        self._pending: list[tuple[int, float]] = []

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            del pending[: MAX_PENDING // 2]
        pending.append((info["generation"], self._clock() - self._started))

    def install(self) -> "GcPauses":
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def drain(self) -> list[tuple[int, float]]:
        """(generation, seconds) of each collection since the last drain, oldest first."""
        out, self._pending = self._pending, []
        return out
