"""Garbage collection in the serving processes: the start-up heap frozen, young collections paced by
time, and the pause of every collection measured.

Called once per process when it is ready to serve: by each proxy worker after its gateway started
(proxy/server.py) and by each replica once its engine is ready (model_proc/server.py). No sockets, no
event loop of its own: `run_paced` / `run_paced_async` are the loops the caller runs in its greenlet or
task (with `GcPacer`, the pure schedule, deciding each step).

Why (scale1000, one proxy worker, 1,000 streams of 6.4 s, measured with gc callbacks):
- CPython starts a young collection when tracked allocations minus deallocations pass 700. Every
  request frees the objects of one that started 6.4 s earlier, long promoted out of generation 0, so
  that count hovers near zero while young objects pile up: a young collection came every ~2.5 s and
  walked 14,000-25,000 objects, 5-23 ms of CPU each; generation 1, about every 30 s, 40 ms. No stream
  gets a token during a collection, so those pauses were the p99 of inter-token latency and TTFT.
- The full (generation 2) collection walked the whole heap, ~117,000 objects of which ~45,000 were
  start-up state: 20-90 ms.
So: `freeze_heap` collects once and `gc.freeze()`s the start-up objects out of every later collection
(what `vllm serve` does after start-up: vllm.utils.gc_utils.freeze_gc_heap); `GcPacer` collects
generation 0 every YOUNG_EVERY seconds and generation 1 every MIDDLE_EVERY-th time, so each pause walks
only what the last 25 ms (or 250 ms) allocated: at most ~2 ms measured, for the same total work (proxy
CPU per token went down, not up); and a full collection every FULL_EVERY seconds (and CPython's own,
made rare by FULL_COLLECTION_EVERY) frees cycles that reached the old generation. Automatic collection
stays on as a backstop for allocation bursts.
Garbage comes with streams (about 0.4 objects per token at scale1000), so the pace follows the streams in
flight (`pace`): every 25 ms from 160 streams, slower below, once a second when idle. Each paced collection
then walks about as few objects at any load, and an idle process wakes once a second instead of 40 times
(an idle stack's proxy worker and each replica used 0.6% of a core, mostly on this).

`GcPauses` times every collection (gc.callbacks) so the proxy can export them
(tokenrelay_proxy_gc_pause_seconds) and a benchmark can tell a GC pause from other latency. Its callback
must not take locks or switch greenlets: it only adds to counters that `drain` hands over.

These are CPython 3.10-3.13 semantics (three generations, threshold 0 counting allocations minus
deallocations). CPython 3.14's incremental collector changes them; check the pacer again there.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from bisect import bisect_left
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

FULL_COLLECTION_EVERY = 1000  # generation-1 collections between two automatic full ones (CPython: 10)
YOUNG_EVERY = 0.025  # seconds between paced generation-0 collections when busy (the fastest pace)
IDLE_EVERY = 1.0  # ... with nothing or one stream in flight (the slowest pace)
STREAM_SECONDS = 4.0  # the pace in between: STREAM_SECONDS / streams in flight (160 or more: YOUNG_EVERY)
MIDDLE_EVERY = 10  # every this many paced collections is of generation 1 (every 0.25 s when busy)
FULL_EVERY = 600.0  # seconds between paced full collections


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


def pace(streams: int) -> float:
    """Seconds until the next paced collection with `streams` requests in flight in this process."""
    if streams <= 0:
        return IDLE_EVERY
    return min(IDLE_EVERY, max(YOUNG_EVERY, STREAM_SECONDS / streams))


class GcPacer:
    """Which generation to collect at each paced step (one step per `pace(streams)` seconds): 0, every
    MIDDLE_EVERY-th step 1, and 2 once FULL_EVERY seconds have passed since the last full one."""

    def __init__(self, now: float) -> None:
        self._steps = 0
        self._next_full = now + FULL_EVERY

    def due(self, now: float) -> int:
        self._steps += 1
        if now >= self._next_full:
            self._next_full = now + FULL_EVERY
            return 2
        return 1 if self._steps % MIDDLE_EVERY == 0 else 0


def run_paced(sleep: Callable[[float], Any], streams: Callable[[], int],
              clock: Callable[[], float] = time.monotonic) -> None:
    """Collect on GcPacer's schedule forever (a proxy worker's greenlet: `sleep` is gevent.sleep;
    `streams` the requests in flight in this process)."""
    pacer = GcPacer(clock())
    while True:
        sleep(pace(streams()))
        gc.collect(pacer.due(clock()))


async def run_paced_async(streams: Callable[[], int], clock: Callable[[], float] = time.monotonic) -> None:
    """The same as a task on an asyncio loop (replicas)."""
    pacer = GcPacer(clock())
    while True:
        await asyncio.sleep(pace(streams()))
        gc.collect(pacer.due(clock()))


class GcPauses:
    """The pause (wall-clock seconds) of every garbage collection in this process, counted per generation
    into histogram buckets (`bounds`: upper bounds, the last one +inf) until `drain`. `install` registers
    the gc callback, `uninstall` removes it. Counting, not listing: an idle worker that nobody scrapes
    collects 40 times a second, and a drain costs one pass over the buckets however long it waited."""

    def __init__(self, bounds: Sequence[float], clock: Callable[[], float] = time.perf_counter) -> None:
        if not bounds or bounds[-1] != math.inf:
            raise ValueError("bounds must end with +inf")
        self._bounds = list(bounds)
        self._clock = clock
        self._started = 0.0
        self._counts: dict[int, list[int]] = {}
        self._sums: dict[int, float] = {}

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        seconds = self._clock() - self._started
        generation = info["generation"]
        counts = self._counts.get(generation)
        if counts is None:
            counts = self._counts[generation] = [0] * len(self._bounds)
        counts[bisect_left(self._bounds, seconds)] += 1
        self._sums[generation] = self._sums.get(generation, 0.0) + seconds

    def install(self) -> "GcPauses":
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def drain(self) -> dict[int, tuple[list[int], float]]:
        """{generation: (collections per bucket, summed seconds)} since the last drain."""
        counts, sums = self._counts, self._sums
        self._counts, self._sums = {}, {}  # a collection during the swap lands in the new ones
        return {g: (c, sums.get(g, 0.0)) for g, c in counts.items()}
