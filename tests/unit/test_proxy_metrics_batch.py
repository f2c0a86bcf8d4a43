"""The proxy's batched inter-token histogram (proxy.metrics.BatchedObservations) must expose exactly what
plain `Histogram.observe` would: same bucket counts, count and sum, in the default and the multiprocess
registry alike. It writes through prometheus_client's internal layout, so this test is what catches a
prometheus_client upgrade that changes it."""
from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from proxy.metrics import BUCKETS, BatchedObservations


def exposition(values: list[float], batched: bool, flush_every: int = 0) -> dict:
    """Every sample but `_created` (a timestamp)."""
    registry = CollectorRegistry()
    hist = Histogram("itl_seconds", "inter-token gaps", ["deployment"], buckets=BUCKETS, registry=registry)
    child = hist.labels("d")
    batch = BatchedObservations(child) if batched else None
    for i, v in enumerate(values):
        if batch is None:
            child.observe(v)
        else:
            batch.observe(v)
            if flush_every and i % flush_every == 0:
                batch.flush()
    if batch is not None:
        batch.flush()
        batch.flush()  # a second flush adds nothing
    samples = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def tolerant(samples: dict) -> dict:
    return {k: pytest.approx(v, rel=1e-9) if k[0].endswith("_sum") else v for k, v in samples.items()}


def test_batched_observations_expose_exactly_what_observe_would() -> None:
    rng = random.Random(7)
    values = [rng.expovariate(1 / 0.05) for _ in range(5000)] + list(BUCKETS) + [0.0, 1e6]  # edges and +Inf
    expected = exposition(values, batched=False)
    assert len(expected) == len(BUCKETS) + 3  # every bucket, +Inf, count and sum
    # the sum is added up in another order: equal up to rounding
    assert exposition(values, batched=True) == tolerant(expected)
    assert exposition(values, batched=True, flush_every=97) == tolerant(expected)


def test_nothing_is_visible_before_a_flush_and_everything_after() -> None:
    registry = CollectorRegistry()
    hist = Histogram("gap_seconds", "gaps", buckets=(0.01, 0.1), registry=registry)
    batch = BatchedObservations(hist)
    batch.observe(0.05)
    batch.observe(0.2)
    assert registry.get_sample_value("gap_seconds_count") == 0
    batch.flush()
    assert registry.get_sample_value("gap_seconds_count") == 2
    assert registry.get_sample_value("gap_seconds_bucket", {"le": "0.1"}) == 1
    assert abs(registry.get_sample_value("gap_seconds_sum") - 0.25) < 1e-9


def test_gc_pauses_reach_the_gc_pause_histogram():
    import gc

    from prometheus_client import REGISTRY

    from proxy import metrics

    def count(generation: str) -> float:
        return REGISTRY.get_sample_value("tokenrelay_proxy_gc_pause_seconds_count",
                                         {"generation": generation}) or 0.0

    before = count("1")
    metrics.watch_gc()
    gc.disable()  # only the two collections below
    try:
        gc.collect(1)
        gc.collect(1)
        metrics._ITL_BATCHES.flush_all(0.0)
    finally:
        gc.enable()
        metrics._GC_PAUSES.uninstall()
    assert count("1") == before + 2
