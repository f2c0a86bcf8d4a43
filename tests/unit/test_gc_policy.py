"""runtime/gc_policy.py: the start-up heap leaves the collector's reach, full collections become rare,
and every collection's pause is recorded by generation."""
import gc

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
    assert frozen == gc.get_freeze_count()
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


def test_pauses_are_recorded_by_generation_and_drained_once():
    pauses = GcPauses(clock=_Clock()).install()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.uninstall()
    drained = pauses.drain()
    assert [g for g, _ in drained] == [0, 2]
    assert all(seconds == pytest.approx(0.004) for _, seconds in drained)
    assert pauses.drain() == []
    gc.collect(1)  # uninstalled: not recorded
    assert pauses.drain() == []


def test_pending_pauses_are_bounded_without_a_drain():
    pauses = GcPauses(clock=_Clock()).install()
    try:
        for _ in range(gc_policy.MAX_PENDING + 10):
            gc.collect(0)
    finally:
        pauses.uninstall()
    assert len(pauses.drain()) <= gc_policy.MAX_PENDING


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

    monkeypatch.setattr(gc_policy.gc, "collect", lambda generation=2: collected.append(generation) or 0)
    with pytest.raises(Stop):
        gc_policy.run_paced(sleep, clock=lambda: 0.0)
    assert slept == [gc_policy.YOUNG_EVERY] * 12
    assert collected == [0] * 9 + [1] + [0] * 2
