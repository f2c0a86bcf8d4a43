"""proxy.idle_connections: which idle client connections a worker closes (pure)."""
from __future__ import annotations

from proxy.idle_connections import IdleConnections


def test_a_flood_from_one_address_is_parked_and_costs_no_other_address() -> None:
    idle = IdleConnections(per_client=3, total=100)
    for n in range(2):
        assert idle.opened(("good", n), "10.0.0.1") == (True, [])
    outcomes = [idle.opened(("flood", n), "10.0.0.9") for n in range(10)]
    assert outcomes == [(True, [])] * 3 + [(False, [])] * 7  # served up to the cap, then parked
    assert idle.idle_of("10.0.0.9") == 3 and idle.idle_of("10.0.0.1") == 2
    assert idle.opened(("good", 9), "10.0.0.1") == (True, [])


def test_busy_connections_are_never_closed_and_count_again_once_idle() -> None:
    idle = IdleConnections(per_client=1, total=100)
    idle.opened("stream", "a")
    idle.busy("stream")  # a request is in flight on it
    assert idle.opened("new", "a") == (True, [])
    assert idle.idle("stream") == ["new"]  # back to idle: now the older idle one of "a" goes
    idle.closed("new")
    assert len(idle) == 1


def test_the_total_bound_closes_the_longest_idle_of_all() -> None:
    idle = IdleConnections(per_client=10, total=3)
    for n, client in enumerate("abcd"):
        served, evicted = idle.opened(n, client)
    assert served and evicted == [0] and len(idle) == 3
