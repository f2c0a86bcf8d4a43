"""Unit tests for proxy.table_state and proxy.backoff (pure: fake clock, no sockets)."""
from __future__ import annotations

import pytest

from proxy.backoff import Backoff
from proxy.table_state import TableState
from runtime.protocol import DeploymentRoute, ReplicaRoute, RoutingTable


def table(epoch: int, version: int, replicas: int = 1, name: str = "tiny") -> RoutingTable:
    routes = [ReplicaRoute("r%d" % i, "tcp://127.0.0.1:%d" % (9000 + i), 0, 0, 0.0, 8) for i in range(replicas)]
    return RoutingTable(epoch, version, 0.0, [DeploymentRoute(name, "fake", "m", routes)])


def test_first_table_is_applied_without_resync() -> None:
    s = TableState(stale_after=3.0)
    offer = s.offer(table(1, 5), now=10.0)
    assert (offer.applied, offer.resync, offer.reason) == (True, False, "first")
    assert s.table.version == 5 and s.deployment("tiny") is not None and s.deployment("other") is None


def test_next_version_applied() -> None:
    s = TableState(3.0)
    s.offer(table(1, 5), 0.0)
    offer = s.offer(table(1, 6, replicas=2), 1.0)
    assert (offer.applied, offer.resync, offer.reason) == (True, False, "next")
    assert len(s.deployment("tiny").replicas) == 2


def test_older_version_ignored_and_does_not_refresh() -> None:
    s = TableState(3.0)
    s.offer(table(1, 5), 0.0)
    offer = s.offer(table(1, 4), 2.9)
    assert (offer.applied, offer.resync, offer.reason) == (False, False, "old")
    assert s.table.version == 5
    assert s.is_stale(3.5)  # the old table did not count as fresh


def test_republish_of_same_version_refreshes_without_applying() -> None:
    s = TableState(3.0)
    first = table(1, 5)
    s.offer(first, 0.0)
    offer = s.offer(table(1, 5, replicas=3), 2.5)
    assert (offer.applied, offer.reason) == (False, "republish")
    assert s.table is first
    assert not s.is_stale(5.0) and s.is_stale(5.6)


def test_gap_applies_and_asks_for_snapshot() -> None:
    s = TableState(3.0)
    s.offer(table(1, 5), 0.0)
    offer = s.offer(table(1, 9), 1.0)
    assert (offer.applied, offer.resync, offer.reason) == (True, True, "gap")
    assert s.table.version == 9


@pytest.mark.parametrize("epoch", [2, 0])
def test_new_epoch_applies_even_with_lower_version_and_resyncs(epoch: int) -> None:
    s = TableState(3.0)
    s.offer(table(1, 50), 0.0)
    offer = s.offer(table(epoch, 1), 1.0)
    assert (offer.applied, offer.resync, offer.reason) == (True, True, "new epoch")
    assert (s.table.epoch, s.table.version) == (epoch, 1)
    assert s.offer(table(epoch, 2), 2.0).reason == "next"


def test_stale_after_silence_but_table_kept() -> None:
    s = TableState(3.0)
    assert s.is_stale(0.0)  # nothing yet
    s.offer(table(1, 1), 100.0)
    assert not s.is_stale(103.0)
    assert s.is_stale(103.01)
    assert s.table is not None and s.deployment("tiny") is not None  # keep routing
    assert s.age(104.0) == pytest.approx(4.0)


def test_staleness_change_reports_once_per_period() -> None:
    s = TableState(1.0)
    assert s.staleness_change(0.0) is None  # no table: nothing to report
    s.offer(table(1, 1), 0.0)
    assert s.staleness_change(0.5) is None
    assert s.staleness_change(1.5) == "stale"
    assert s.staleness_change(2.0) is None
    assert s.staleness_change(9.0) is None
    s.offer(table(1, 1), 9.5)  # republish
    assert s.staleness_change(9.6) == "fresh"
    assert s.staleness_change(9.7) is None
    assert s.staleness_change(11.0) == "stale"


def test_readiness_reasons() -> None:
    s = TableState(3.0)
    ready, reason = s.readiness(0.0)
    assert not ready and "no routing table" in reason
    s.offer(table(1, 1, replicas=0), 0.0)
    ready, reason = s.readiness(1.0)
    assert not ready and "healthy replica" in reason
    s.offer(table(1, 2, replicas=1), 1.0)
    assert s.readiness(2.0) == (True, "ok")
    assert s.readiness(2.0, reachable=1) == (True, "ok")
    # a fresh table, but no replica of it takes this proxy (its key not on their hosts, or revoked)
    ready, reason = s.readiness(2.0, reachable=0)
    assert not ready and "refuses this proxy's key" in reason
    ready, reason = s.readiness(10.0)
    assert not ready and "stale" in reason and "no replica" in reason
    ready, reason = s.readiness(10.0, reachable=0)
    assert not ready and "stale" in reason
    # the head is gone but the replicas are not: still ready, saying the table is stale
    ready, reason = s.readiness(10.0, reachable=2)
    assert ready and "stale" in reason and "2 replica(s) reachable" in reason


def test_a_scaled_to_zero_deployment_keeps_the_proxy_ready() -> None:
    # no replica, but requests wait for one to start (cold start): the proxy can serve them
    s = TableState(3.0)
    cold = DeploymentRoute("tiny", "fake", "m", [], cold_start_timeout_s=60.0)
    s.offer(RoutingTable(1, 1, 0.0, [cold]), 0.0)
    assert s.readiness(1.0) == (True, "ok")
    assert s.readiness(1.0, reachable=0) == (True, "ok")


def test_backoff_doubles_to_a_cap_and_resets() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.attempts == 5
    b.reset()
    assert b.next() == 0.5


def test_backoff_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)


@pytest.mark.parametrize("publish,expected", [
    ("tcp://10.0.0.5:7001", "tcp://10.0.0.5:7001"),
    ("tcp://0.0.0.0:7001", "tcp://head.example:7001"),
    ("tcp://*:7001", "tcp://head.example:7001"),
    ("ipc:///tmp/pub", "ipc:///tmp/pub"),
])
def test_publish_endpoint_made_connectable(publish: str, expected: str) -> None:
    from proxy.subscriber import connectable_endpoint

    assert connectable_endpoint(publish, "tcp://head.example:7000") == expected
