"""Unit tests for proxy.router (pure: no sockets, seeded RNG, times passed in)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.router import DOWN, FULL, NONE, Policy, ReplicaView, Router, estimated_load, has_room, route_key

NOW = 100.0
P2C = Policy("p2c", max_imbalance=2, stale_after=3.0)
PREFIX = Policy("prefix", max_imbalance=2, stale_after=3.0)


def view(rid: str, reported: int = 0, mine: int = 0, since: int = 0, limit: int = 10, age: float = 0.1,
         **kw: object) -> ReplicaView:
    return ReplicaView(rid, limit, reported, NOW - age, mine, since, **kw)  # type: ignore[arg-type]


def picks(router: Router, views: list[ReplicaView], policy: Policy = P2C, n: int = 300, **kw: object) -> Counter:
    return Counter(router.choose(views, policy, NOW, **kw).replica_id for _ in range(n))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- load accounting


@pytest.mark.parametrize("reported, mine, since, expected", [
    (0, 0, 0, 0),
    (5, 0, 0, 5),       # others' load as reported
    (5, 2, 0, 5),       # my two are inside the report
    (5, 3, 3, 8),       # three of mine were sent after it: not in it yet
    (1, 4, 1, 4),       # the report is behind on my own older ones: never count less than I know
    (0, 2, 2, 2),
])
def test_estimated_load_counts_reported_plus_mine_since(reported: int, mine: int, since: int,
                                                         expected: int) -> None:
    assert estimated_load(view("a", reported, mine, since)) == expected


def test_room_is_load_below_the_limit() -> None:
    assert has_room(view("a", reported=3, limit=4))
    assert not has_room(view("a", reported=3, mine=1, since=1, limit=4))
    assert not has_room(view("a", reported=9, limit=4))


@pytest.mark.parametrize("reported, mine, since, workers, room", [
    (0, 0, 0, 2, True),    # 10 free, share 5
    (0, 5, 5, 2, False),   # share used up until the next report
    (0, 4, 4, 2, True),
    (7, 0, 0, 2, True),    # 3 free: share 2 (ceil)
    (7, 2, 2, 2, False),
    (9, 0, 0, 4, True),    # 1 free: every worker may take it (overshoot <= workers - 1)
    (9, 1, 1, 4, False),
    (10, 0, 0, 1, False),
    (0, 9, 9, 1, True),    # a lone worker may use all of it
])
def test_workers_share_the_free_capacity_between_reports(reported: int, mine: int, since: int, workers: int,
                                                          room: bool) -> None:
    assert has_room(view("a", reported, mine, since, limit=10), workers) is room


def test_all_workers_together_overshoot_by_at_most_workers_minus_one() -> None:
    for workers in (1, 2, 3, 8):
        for reported in range(0, 11):
            sends = 0
            for _ in range(workers):  # every worker acts on the same report before the next one
                since = 0
                while has_room(view("a", reported, since, since, limit=10), workers):
                    since += 1
                sends += since
            assert reported + sends <= max(10, reported) + workers - 1, (workers, reported, sends)


# --------------------------------------------------------------------------- power of two choices


def test_p2c_never_picks_the_most_loaded_and_favours_the_least() -> None:
    router = Router(random.Random(0))
    got = picks(router, [view("a", 1), view("b", 4), view("c", 7)])
    assert "c" not in got
    assert got["a"] > got["b"] > 0


def test_p2c_uses_this_workers_own_in_flight_requests() -> None:
    router = Router(random.Random(3))
    # equal reports, but three requests of mine went to b since: a wins every time
    got = picks(router, [view("a", 2), view("b", 2, mine=3, since=3)])
    assert got == Counter({"a": 300})


def test_full_replicas_are_skipped_and_all_full_is_FULL() -> None:
    router = Router(random.Random(1))
    assert picks(router, [view("a", 10), view("b", 2)]) == Counter({"b": 300})
    d = router.choose([view("a", 10), view("b", 9, mine=1, since=1)], P2C, NOW)
    assert d.outcome == FULL and d.replica_id is None


def test_no_usable_replica_is_NONE_or_DOWN_when_listed_ones_are_down_for_now() -> None:
    router = Router(random.Random(1))
    assert router.choose([], P2C, NOW).outcome == NONE
    assert router.choose([view("c")], P2C, NOW, exclude={"c"}).outcome == NONE  # tried already
    views = [view("a", down=True), view("b", allowed=False), view("c")]
    # listed but down or ejected: they may come back (restarting), the caller waits for one
    assert router.choose(views, P2C, NOW, exclude={"c"}).outcome == DOWN


def test_down_ejected_and_already_tried_replicas_are_never_chosen() -> None:
    router = Router(random.Random(2))
    views = [view("dead", down=True), view("ejected", allowed=False), view("tried"), view("busy", 8)]
    assert picks(router, views, exclude=frozenset({"tried"})) == Counter({"busy": 300})


def test_connected_replicas_preferred_over_connecting_ones() -> None:
    router = Router(random.Random(1))
    got = picks(router, [view("new", 0, connected=False), view("old", 5)])
    assert got == Counter({"old": 300})
    assert router.choose([view("x", connected=False)], P2C, NOW).replica_id == "x"


def test_stale_reports_are_avoided_while_fresh_ones_have_room() -> None:
    router = Router(random.Random(4))
    views = [view("stale", 0, age=10.0), view("fresh", 6, age=0.5)]
    assert picks(router, views) == Counter({"fresh": 300})
    # the fresh one is full: the stale one is better than a queue
    views = [view("stale", 0, age=10.0), view("fresh", 10, age=0.5)]
    assert picks(router, views) == Counter({"stale": 300})
    # never reported at all counts as stale too
    never = ReplicaView("never", 10, 0, float("-inf"))
    assert picks(router, [never, view("fresh", 3)]) == Counter({"fresh": 300})


def test_same_seed_same_choices() -> None:
    views = [view(str(i), i % 3) for i in range(6)]
    r1, r2 = Router(random.Random(7)), Router(random.Random(7))
    a = [r1.choose(views, P2C, NOW).replica_id for _ in range(40)]
    assert a == [r2.choose(views, P2C, NOW).replica_id for _ in range(40)]
    assert len(set(a)) > 1


# --------------------------------------------------------------------------- keys: prefix and session


def test_a_key_always_goes_to_the_same_replica_when_loads_are_even() -> None:
    router = Router(random.Random(5))
    views = [view(r, 1) for r in "abcd"]
    for key in ("k1", "k2", "system prompt X"):
        assert len(picks(router, views, PREFIX, 50, key=key)) == 1


def test_keys_spread_over_replicas_and_only_a_leavers_keys_move() -> None:
    router = Router(random.Random(6))
    views = [view(r) for r in "abcd"]
    keys = ["prefix-%d" % i for i in range(400)]
    before = {k: router.choose(views, PREFIX, NOW, key=k).replica_id for k in keys}
    counts = Counter(before.values())
    assert set(counts) == set("abcd") and min(counts.values()) > 60
    after = {k: router.choose(views[:3], PREFIX, NOW, key=k).replica_id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "d" for k in moved)  # consistent hashing


def test_key_target_kept_within_the_imbalance_bound_then_p2c() -> None:
    router = Router(random.Random(8))
    even = [view(r, 0) for r in "abc"]
    target = router.choose(even, PREFIX, NOW, key="hot").replica_id
    others = [r for r in "abc" if r != target]
    # target at least + 2 (the bound): still the target
    views = [view(target, 2)] + [view(r, 0) for r in others]
    assert picks(router, views, PREFIX, 50, key="hot") == Counter({target: 50})
    # one more: it is overloaded relative to the others, so the key falls back to power of two
    views = [view(target, 3)] + [view(r, 0) for r in others]
    got = picks(router, views, PREFIX, 200, key="hot")
    assert target not in got and set(got) == set(others)


def test_key_target_that_is_full_or_ejected_falls_back() -> None:
    router = Router(random.Random(9))
    views = [view(r, 0) for r in "ab"]
    target = router.choose(views, PREFIX, NOW, key="s").replica_id
    other = "b" if target == "a" else "a"
    full = [view(target, 10), view(other, 9)]
    assert router.choose(full, PREFIX, NOW, key="s").replica_id == other
    ejected = [view(target, 0, allowed=False), view(other, 5)]
    assert router.choose(ejected, PREFIX, NOW, key="s").replica_id == other


def test_route_key_session_beats_prefix_and_prefix_needs_the_policy() -> None:
    assert route_key("p2c", 4, True, None, "abcdefgh") is None
    assert route_key("prefix", 4, True, None, "abcdefgh") == "prefix:abcd"
    assert route_key("prefix", 4, True, None, "abcdXYZ") == route_key("prefix", 4, True, None, "abcdefgh")
    assert route_key("p2c", 4, True, "s-1", "abcdefgh") == "session:s-1"
    assert route_key("prefix", 4, True, "s-1", "abcdefgh") == "session:s-1"
    assert route_key("p2c", 4, False, "s-1", "abcdefgh") is None
    assert route_key("prefix", 4, True, None, "") is None
