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
