"""Unit tests for proxy.router (pure: no sockets, seeded RNG)."""
from __future__ import annotations

import random
from collections import Counter

from proxy.router import LeastInFlightRouter, ReplicaLoad


def test_picks_least_in_flight() -> None:
    router = LeastInFlightRouter(random.Random(0))
    loads = [ReplicaLoad("a", 5), ReplicaLoad("b", 1), ReplicaLoad("c", 3)]
    assert all(router.choose(loads) == "b" for _ in range(20))


def test_ties_are_broken_randomly_among_the_least_loaded_only() -> None:
    router = LeastInFlightRouter(random.Random(42))
    loads = [ReplicaLoad("a", 2), ReplicaLoad("b", 2), ReplicaLoad("c", 9)]
    picks = Counter(router.choose(loads) for _ in range(400))
    assert set(picks) == {"a", "b"}
    assert min(picks.values()) > 120  # both get a fair share


def test_same_seed_same_choices() -> None:
    loads = [ReplicaLoad(str(i), 0) for i in range(5)]
    r1, r2 = LeastInFlightRouter(random.Random(7)), LeastInFlightRouter(random.Random(7))
    picks = [r1.choose(loads) for _ in range(30)]
    assert picks == [r2.choose(loads) for _ in range(30)]
    assert len(set(picks)) > 1


def test_down_replicas_are_never_chosen() -> None:
    router = LeastInFlightRouter(random.Random(1))
    loads = [ReplicaLoad("dead", 0, down=True), ReplicaLoad("busy", 50)]
    assert all(router.choose(loads) == "busy" for _ in range(20))


def test_connected_replicas_preferred_over_connecting_ones() -> None:
    router = LeastInFlightRouter(random.Random(1))
    loads = [ReplicaLoad("new", 0, connected=False), ReplicaLoad("old", 10, connected=True)]
    assert router.choose(loads) == "old"


def test_connecting_replicas_used_when_nothing_is_connected() -> None:
    router = LeastInFlightRouter(random.Random(1))
    loads = [ReplicaLoad("x", 3, connected=False), ReplicaLoad("y", 1, connected=False)]
    assert router.choose(loads) == "y"


def test_no_candidates() -> None:
    router = LeastInFlightRouter(random.Random(1))
    assert router.choose([]) is None
    assert router.choose([ReplicaLoad("a", 0, down=True)]) is None
