"""runtime/gc_policy.py: the start-up heap leaves the collector's reach, full collections become rare,
and every collection's pause is recorded by generation."""
import gc
import itertools

import pytest

from runtime import gc_policy
from runtime.gc_policy import GcPauses

pytestmark = pytest.mark.unit


@pytest.fixture
def restore_gc():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_freeze_heap_takes_the_live_objects_out_of_collections(restore_gc):
    before = len(gc.get_objects())
    frozen = gc_policy.freeze_heap()
    # frozen objects may still be freed (a thread of an earlier test dropping its last reference): the
    # count can only fall after the freeze, by a few (it fell by 2 in one CI run)
    assert frozen - 100 < gc.get_freeze_count() <= frozen
    assert frozen > 1000
    # a full collection now walks only what was made after the freeze
    assert len(gc.get_objects()) < before - 1000


def test_rare_full_collections_keeps_young_thresholds(restore_gc):
    gc.set_threshold(700, 10, 10)
    assert gc_policy.rare_full_collections() == (700, 10, gc_policy.FULL_COLLECTION_EVERY)
    assert gc.get_threshold() == (700, 10, gc_policy.FULL_COLLECTION_EVERY)


def test_prepare_to_serve_logs_what_it_did(restore_gc, caplog):
    caplog.set_level("INFO", logger="runtime.gc_policy")
    gc_policy.prepare_to_serve("proxy worker")
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[2] == gc_policy.FULL_COLLECTION_EVERY
    assert "proxy worker" in caplog.text and "frozen" in caplog.text


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.004  # every reading is 4 ms after the last: each pause reads 4 ms
        return self.t


BOUNDS = (0.001, 0.005, float("inf"))


def test_pauses_are_counted_by_generation_and_bucket_and_drained_once():
    pauses = GcPauses(BOUNDS, clock=_Clock()).install()
    gc.disable()  # only the collections below
    try:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        gc.enable()
        pauses.uninstall()
    drained = pauses.drain()
    assert sorted(drained) == [0, 2]
    assert drained[0][0] == [0, 1, 0]  # one pause of 4 ms: the (1 ms, 5 ms] bucket
    assert drained[2][0] == [0, 2, 0] and drained[2][1] == pytest.approx(0.008)
    assert pauses.drain() == {}
    gc.collect(1)  # uninstalled: not counted
    assert pauses.drain() == {}


def test_an_idle_worker_loses_no_pause_however_long_between_drains():
    pauses = GcPauses(BOUNDS, clock=_Clock()).install()
    gc.disable()
    try:
        for _ in range(10_000):
            gc.collect(0)
    finally:
        gc.enable()
        pauses.uninstall()
    counts, total = pauses.drain()[0]
    assert sum(counts) == 10_000 and total == pytest.approx(40.0)


def test_bounds_must_end_with_infinity():
    with pytest.raises(ValueError):
        GcPauses((0.001, 0.01))


def test_the_pacer_collects_young_often_middle_every_tenth_and_full_rarely():
    pacer = gc_policy.GcPacer(now=0.0)
    steps = [pacer.due(i * gc_policy.YOUNG_EVERY) for i in range(1, 41)]
    assert steps.count(1) == 4 and steps.count(2) == 0
    assert [i for i, g in enumerate(steps, 1) if g == 1] == [10, 20, 30, 40]
    assert pacer.due(gc_policy.FULL_EVERY) == 2  # a full collection once FULL_EVERY passed
    assert pacer.due(gc_policy.FULL_EVERY + 1.0) != 2  # ... and not again until the next FULL_EVERY
    assert pacer.due(2 * gc_policy.FULL_EVERY) == 2


def test_the_paced_loop_sleeps_then_collects_on_schedule(monkeypatch):
    collected, slept = [], []

    class Stop(Exception):
        pass

    def sleep(seconds):
        if len(slept) == 12:
            raise Stop
        slept.append(seconds)

    streams = itertools.chain([1000] * 6, itertools.repeat(0))  # busy, then idle
    monkeypatch.setattr(gc_policy.gc, "collect", lambda generation=2: collected.append(generation) or 0)
    with pytest.raises(Stop):
        gc_policy.run_paced(sleep, lambda: next(streams), clock=lambda: 0.0)
    assert slept == [gc_policy.YOUNG_EVERY] * 6 + [gc_policy.IDLE_EVERY] * 6
    assert collected == [0] * 9 + [1] + [0] * 2


def test_the_pace_follows_the_streams_in_flight():
    # idle (and one stream): once a second, not 40 times; busy: every 25 ms; in between, the same walk
    assert gc_policy.pace(0) == gc_policy.pace(1) == gc_policy.IDLE_EVERY == 1.0
    assert gc_policy.pace(16) == pytest.approx(0.25)
    assert gc_policy.pace(160) == gc_policy.pace(10_000) == gc_policy.YOUNG_EVERY
    paces = [gc_policy.pace(n) for n in range(0, 400)]
    assert paces == sorted(paces, reverse=True)  # more streams never slow the pace
