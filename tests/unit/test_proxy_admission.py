"""Unit tests for proxy.admission (queue and decisions) and proxy.breaker (pure: times passed in)."""
from __future__ import annotations

import pytest

from proxy.admission import (
    ADMIT, REJECT_FULL, REJECT_NONE, REJECT_TIMEOUT, WAIT, AdmissionQueue, decide, retry_after,
)
from proxy.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, Breakers
from proxy.router import FULL, NONE, ROUTE

# --------------------------------------------------------------------------- admission decisions


def test_route_admits_and_none_is_503_whatever_the_queue() -> None:
    q = AdmissionQueue(size=2, timeout=1.0)
    assert decide(ROUTE, None, q, 0.0) == ADMIT
    assert decide(NONE, None, q, 0.0) == REJECT_NONE
    t = q.join(0.0)
    assert decide(ROUTE, t, q, 0.5) == ADMIT
    assert decide(NONE, t, q, 0.5) == REJECT_NONE


def test_full_waits_while_the_queue_has_room_else_rejects_at_once() -> None:
    q = AdmissionQueue(size=2, timeout=1.0)
    assert decide(FULL, None, q, 0.0) == WAIT
    a, b = q.join(0.0), q.join(0.0)
    assert a is not None and b is not None
    assert q.join(0.0) is None  # bounded: a third ticket is refused
    assert decide(FULL, None, q, 0.0) == REJECT_FULL


def test_no_queue_configured_rejects_at_once() -> None:
    assert decide(FULL, None, AdmissionQueue(size=0, timeout=1.0), 0.0) == REJECT_FULL
    assert decide(FULL, None, AdmissionQueue(size=5, timeout=0.0), 0.0) == REJECT_FULL
    assert AdmissionQueue(size=5, timeout=0.0).join(0.0) is None


def test_a_ticket_waits_until_its_deadline_then_times_out() -> None:
    q = AdmissionQueue(size=4, timeout=2.0)
    t = q.join(10.0)
    assert t is not None and t.deadline == 12.0
    assert decide(FULL, t, q, 11.9) == WAIT
    assert decide(FULL, t, q, 12.0) == REJECT_TIMEOUT
    q.resize(4, 30.0)
    assert t.deadline == 12.0  # new settings do not stretch tickets already waiting


def test_fifo_only_the_first_tries_and_leaving_wakes_the_next() -> None:
    woken: list[str] = []
    q = AdmissionQueue(size=3, timeout=5.0)
    a = q.join(0.0, lambda: woken.append("a"))
    b = q.join(0.0, lambda: woken.append("b"))
    c = q.join(0.0, lambda: woken.append("c"))
    assert a and b and c
    assert q.is_first(a) and not q.is_first(b)
    q.wake_first()
    assert woken == ["a"]
    q.leave(b)  # a ticket in the middle leaves (timed out): nobody new is first, nobody woken
    assert woken == ["a"] and len(q) == 2
    q.leave(a)  # the first is admitted: the next one gets its turn
    assert woken == ["a", "c"] and q.is_first(c)
    q.leave(a)  # idempotent
    assert len(q) == 1
    q.leave(c)
    assert len(q) == 0
    q.wake_first()  # empty: nothing to wake
    assert woken == ["a", "c"]


@pytest.mark.parametrize("seconds, header", [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (7.5, "8")])
def test_retry_after_is_whole_seconds_at_least_one(seconds: float, header: str) -> None:
    assert retry_after(seconds) == header


# --------------------------------------------------------------------------- circuit breaker


def test_breaker_opens_after_consecutive_failures_only() -> None:
    b = Breaker(failures=3, cooldown=5.0)
    assert b.failure(0.0) is False and b.failure(0.1) is False
    b.success(0.2)  # a success resets the streak
    assert b.failure(0.3) is False and b.failure(0.4) is False
    assert b.state(0.4) == CLOSED and b.allow(0.4)
    assert b.failure(0.5) is True
    assert b.state(0.6) == OPEN and not b.allow(0.6)
    assert b.failure(0.7) is False  # already open: not a new ejection


def test_breaker_half_open_lets_one_probe_through() -> None:
    b = Breaker(failures=1, cooldown=5.0)
    b.failure(0.0)
    assert not b.allow(4.9)
    assert b.state(5.0) == HALF_OPEN and b.allow(5.0)
    assert b.on_send(5.0) is True  # the probe
    assert not b.allow(5.1)  # one at a time
    assert b.on_send(5.1) is False
    b.success(5.2)
    assert b.state(5.2) == CLOSED and b.allow(5.2)


def test_breaker_failed_probe_doubles_the_cooldown_up_to_the_cap() -> None:
    b = Breaker(failures=1, cooldown=5.0, max_cooldown=12.0)
    b.failure(0.0)
    b.on_send(5.0)
    assert b.failure(5.5) is True and b.current_cooldown == 10.0
    assert not b.allow(15.4) and b.allow(15.5)
    b.on_send(15.5)
    b.failure(16.0)
    assert b.current_cooldown == 12.0
    assert b.state(27.9) == OPEN and b.state(28.0) == HALF_OPEN


def test_breaker_probe_that_never_reports_frees_the_slot_after_a_cooldown() -> None:
    b = Breaker(failures=1, cooldown=2.0)
    b.failure(0.0)
    assert b.on_send(2.0)
    assert not b.allow(3.9)
    assert b.allow(4.0)  # the probe's client went away: try again


def test_breakers_never_eject_more_than_the_share_of_a_deployment() -> None:
    board = Breakers(failures=2, cooldown=5.0, max_share=0.5)
    reps = [("r%d" % i, "tcp://h:%d" % i) for i in range(4)]
    outcomes = [board.failure(r, reps, 0.0) for _ in range(2) for r in reps]  # every replica fails twice
    ejected = [r for r in reps if board.get(r).state(0.1) == OPEN]
    assert len(ejected) == 2  # half of four; the other two stay in rotation
    assert sum(1 for opened, capped in outcomes if capped) == 2
    # once an ejected one is back, another may go
    board.get(ejected[0]).success(1.0)
    kept = [r for r in reps if r not in ejected][0]
    assert board.failure(kept, reps, 1.0) == (True, False)


def test_breakers_with_one_replica_never_eject_it_at_the_default_share() -> None:
    board = Breakers(failures=1, cooldown=5.0)
    only = [("r0", "tcp://h:1")]
    assert board.failure(only[0], only, 0.0) == (False, True)
    assert board.get(only[0]).allow(0.0)


def test_a_restarted_replica_is_a_new_incarnation_with_a_clean_breaker() -> None:
    board = Breakers(failures=1, cooldown=60.0, max_share=1.0)
    old, new = ("r0", "tcp://h:1000"), ("r0", "tcp://h:2000")
    assert board.failure(old, [old], 0.0) == (True, False)
    assert not board.get(old).allow(1.0)
    assert board.get(new).allow(1.0)  # same replica id, new process (new port): not ejected
