"""Unit tests for proxy.dispatch: admission waits, retries before the first token, timeouts.

No sockets: a FakeCluster hands out RequestStreams pre-filled with scripted replica events. The Dispatch
sleeps on gevent events but reads time from a FakeClock: frozen (a deadline never passes by itself, so a
test decides what happens first by ordering events) or stepping on every read (deadlines pass after a few
reads, whatever the machine's load). Frozen is the default: a test that needs a deadline to pass says so.
No assert reads the wall clock.
"""
from __future__ import annotations

from typing import Callable, Optional

import gevent
import pytest

from proxy.admission import AdmissionQueue
from proxy.dispatch import Dispatch, Limits
from proxy.errors import ClientGone, NoHealthyReplica, Overloaded, UpstreamError, UpstreamTimeout
from proxy.replicas import ReplicaUnavailable
from proxy.router import DOWN, FULL, NONE, ROUTE, Decision
from proxy.streams import Item, RequestStream
from runtime.protocol import KEY_REFUSED, SHUTTING_DOWN, Delta, GenerateRequest, RequestError

Script = Callable[[str], list[Item]]


def ok(rid: str) -> list[Item]:
    return [Delta(rid, "hi", None, 1, 1), Delta(rid, "!", "stop", 1, 2)]


def refuse(rid: str) -> list[Item]:
    return [RequestError(rid, 503, "replica is overloaded")]


class FakeCluster:
    def __init__(self, scripts: dict[str, Script], capacity: int = 10, queue_size: int = 4,
                 queue_timeout: float = 1.0) -> None:
        self.scripts = scripts
        self.free = {rid: capacity for rid in scripts}
        self.unreachable: set[str] = set()
        self.q = AdmissionQueue(queue_size, queue_timeout)
        self.sent: list[str] = []
        self.records: list[tuple[str, bool]] = []
        self.streams: list[RequestStream] = []
        self.down = False
        self.draining: set[str] = set()

    def choose(self, deployment: str, key: Optional[str], exclude: frozenset[str]) -> Decision:
        usable = [r for r in self.scripts if r not in exclude]
        if not usable:
            return Decision(NONE)
        usable = [r for r in usable if r not in self.draining]  # as ReplicaConnection.draining
        if self.down or not usable:  # listed, but every one is down or draining for now
            return Decision(DOWN)
        roomy = [r for r in usable if self.free[r] > 0]
        return Decision(ROUTE, roomy[0]) if roomy else Decision(FULL)

    def send(self, replica_id: str, request: GenerateRequest) -> RequestStream:
        self.sent.append(replica_id)
        if replica_id in self.unreachable:
            raise ReplicaUnavailable("send queue to replica %s is full" % replica_id)
        self.free[replica_id] -= 1
        stream = RequestStream(request.request_id, replica_id, on_close=self._release)
        for item in self.scripts[replica_id](request.request_id):
            stream.push(item)
            if isinstance(item, RequestError) and item.type == SHUTTING_DOWN:
                self.draining.add(replica_id)
        self.streams.append(stream)
        return stream

    def _release(self, stream: RequestStream) -> None:
        self.free[stream.replica_id] += 1
        self.q.wake_first()

    def queue(self, deployment: str) -> AdmissionQueue:
        return self.q

    def record(self, replica_id: str, ok: bool) -> None:
        self.records.append((replica_id, ok))


class FakeClock:
    """Time that moves only when told: by `advance`, or by `step` seconds on every read."""

    def __init__(self, step: float = 0.0) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


LIMITS = Limits(first_token=0.3, total=5.0, max_attempts=3, retry_window=5.0)


def dispatch(cluster: FakeCluster, limits: Limits = LIMITS, rid: str = "q1",
             client_gone: Callable[[], bool] = lambda: False, clock: Optional[FakeClock] = None) -> Dispatch:
    return Dispatch(cluster, "dep", GenerateRequest(rid, prompt="x"), None, limits,
                    clock if clock is not None else FakeClock(), client_gone)


def when(condition: Callable[[], bool], then: Callable[[], object]) -> gevent.Greenlet:
    """Run `then` once `condition` holds (checked each time the other greenlets yield)."""
    def run() -> None:
        while not condition():
            gevent.sleep(0)
        then()
    return gevent.spawn(run)


# --------------------------------------------------------------------------- happy path and retries


def test_first_token_from_the_chosen_replica() -> None:
    c = FakeCluster({"r1": ok})
    d = dispatch(c)
    d.admit()
    first = d.first(None)
    assert first is not None and first.text == "hi" and d.stream.replica_id == "r1"
    assert c.records == [("r1", True)] and d.attempts == 1


def test_refused_before_the_first_token_is_retried_on_another_replica() -> None:
    c = FakeCluster({"r1": refuse, "r2": ok})
    d = dispatch(c)
    d.admit()
    first = d.first(None)
    assert first is not None and d.stream.replica_id == "r2"
    assert c.sent == ["r1", "r2"]
    assert c.records == [("r1", False), ("r2", True)]
    assert c.streams[0].closed  # the failed attempt was let go


def test_a_drain_refusal_is_retried_elsewhere_and_never_held_against_the_replica() -> None:
    c = FakeCluster({"r1": lambda rid: [RequestError(rid, 503, "replica is shutting down", SHUTTING_DOWN)],
                     "r2": ok})
    d = dispatch(c)
    d.admit()
    assert d.first(None) is not None and d.stream.replica_id == "r2"
    assert c.records == [("r2", True)]  # r1 is draining: not a failure


def test_a_replica_that_refuses_this_proxys_key_is_a_server_fault_retried_elsewhere() -> None:
    """A key revoked (or not yet copied) on one agent host: its replicas answer 403 permission_error. The
    client did nothing wrong: the request goes to another replica, and the refusal counts against r1."""
    def refuse(rid: str) -> list[RequestError]:
        return [RequestError(rid, 403, "this proxy's key is not accepted (revoked)", KEY_REFUSED)]

    c = FakeCluster({"r1": refuse, "r2": ok})
    d = dispatch(c)
    d.admit()
    assert d.first(None) is not None and d.stream.replica_id == "r2"
    assert c.records == [("r1", False), ("r2", True)]
    alone = FakeCluster({"r1": refuse})
    d = dispatch(alone)
    d.admit()
    with pytest.raises(UpstreamError) as info:
        d.first(None)
    assert info.value.status == 503  # never the replica's 403: the client's key is fine


def test_every_replica_down_waits_in_the_queue_for_one_to_come_back() -> None:
    c = FakeCluster({"r1": ok}, queue_timeout=1.0)
    c.down = True
    when(lambda: len(c.q) == 1, lambda: (setattr(c, "down", False), c.q.wake_first()))
    d = dispatch(c, clock=FakeClock())  # frozen: only the replica coming back can end the wait
    d.admit()
    assert d.first(None) is not None and c.sent == ["r1"]


def test_every_replica_down_past_the_queue_timeout_is_503_not_429() -> None:
    c = FakeCluster({"r1": ok}, queue_timeout=0.2)
    c.down = True
    with pytest.raises(NoHealthyReplica, match="down"):
        dispatch(c, clock=FakeClock(step=0.05)).admit()


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_client_error_is_never_retried_nor_held_against_the_replica(status: int) -> None:
    c = FakeCluster({"r1": lambda rid: [RequestError(rid, status, "bad prompt", "invalid_request_error", "prompt")],
                     "r2": ok})
    d = dispatch(c)
    d.admit()
    with pytest.raises(UpstreamError) as info:
        d.first(None)
    assert info.value.status == status and info.value.param == "prompt"
    assert c.sent == ["r1"] and c.records == [("r1", True)]


def test_a_server_error_that_is_not_a_refusal_is_not_retried() -> None:
    c = FakeCluster({"r1": lambda rid: [RequestError(rid, 500, "engine exploded")], "r2": ok})
    d = dispatch(c)
    d.admit()
    with pytest.raises(UpstreamError) as info:
        d.first(None)
    assert info.value.status == 500 and c.sent == ["r1"] and c.records == [("r1", False)]


def test_retries_are_bounded_by_attempts() -> None:
    c = FakeCluster({"r1": refuse, "r2": refuse, "r3": refuse, "r4": ok})
    d = dispatch(c, Limits(first_token=1.0, total=5.0, max_attempts=2))
    d.admit()
    with pytest.raises(UpstreamError) as info:
        d.first(None)
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "1"
    assert c.sent == ["r1", "r2"]


def test_retries_are_bounded_by_the_retry_window() -> None:
    c = FakeCluster({"r1": refuse, "r2": ok})
    d = dispatch(c, Limits(first_token=1.0, total=5.0, max_attempts=3, retry_window=0.0))
    d.admit()
    with pytest.raises(UpstreamError):
        d.first(None)
    assert c.sent == ["r1"]


def test_every_replica_failed_gives_the_last_error() -> None:
    c = FakeCluster({"r1": refuse, "r2": lambda rid: [Delta(rid, "", "abort", 1, 0)]})
    d = dispatch(c)
    d.admit()
    with pytest.raises(UpstreamError) as info:
        d.first(None)
    assert info.value.status == 503 and "aborted by the replica" in info.value.message
    assert c.sent == ["r1", "r2"]


def test_unreachable_replica_on_send_moves_on() -> None:
    c = FakeCluster({"r1": ok, "r2": ok})
    c.unreachable.add("r1")
    d = dispatch(c)
    d.admit()
    assert d.stream.replica_id == "r2" and c.records == [("r1", False)]


def test_first_token_timeout_still_applies_after_an_unreachable_first_choice() -> None:
    c = FakeCluster({"r1": ok, "r2": lambda rid: []})
    c.unreachable.add("r1")
    d = dispatch(c, Limits(first_token=0.1, total=5.0), clock=FakeClock(step=0.05))
    d.admit()
    with pytest.raises(UpstreamTimeout, match="first token"):  # not the 5 s total limit
        d.first(None)
    assert c.sent == ["r1", "r2"]


def test_no_replica_at_all_is_503() -> None:
    with pytest.raises(NoHealthyReplica) as info:
        dispatch(FakeCluster({})).admit()
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "1"


# --------------------------------------------------------------------------- first token timing


def test_first_returns_none_after_its_timeout_and_the_token_later() -> None:
    c = FakeCluster({"r1": lambda rid: []})
    clock = FakeClock(step=0.02)
    d = dispatch(c, clock=clock)
    d.admit()
    assert d.first(0.05) is None and clock.now >= 0.05  # it gave up once its timeout had passed
    clock.step = 0.0  # frozen: only the token can end the next wait
    when(lambda: True, lambda: d.stream.push(Delta("q1", "late", None, 1, 1)))
    assert d.first(1.0).text == "late"


def test_first_token_timeout_aborts_and_counts_against_the_replica() -> None:
    c = FakeCluster({"r1": lambda rid: [], "r2": ok})
    d = dispatch(c, Limits(first_token=0.1, total=5.0), clock=FakeClock(step=0.05))
    d.admit()
    with pytest.raises(UpstreamTimeout) as info:
        d.first(None)
    assert info.value.status == 504 and "first token" in info.value.message
    assert c.streams[0].closed and not c.streams[0].finished  # closed unfinished: Abort at the replica
    assert c.records == [("r1", False)] and c.sent == ["r1"]  # a timeout is not retried


def test_client_gone_while_waiting_for_the_first_token() -> None:
    c = FakeCluster({"r1": lambda rid: []})
    gone = {"now": False}
    d = dispatch(c, client_gone=lambda: gone["now"], clock=FakeClock())  # frozen: no timeout comes first
    d.admit()
    gevent.spawn_later(0.05, gone.__setitem__, "now", True)
    with pytest.raises(ClientGone):
        d.first(None)


# --------------------------------------------------------------------------- admission queue


def test_full_without_a_queue_is_429_at_once() -> None:
    c = FakeCluster({"r1": ok}, capacity=0, queue_size=0)
    with pytest.raises(Overloaded) as info, gevent.Timeout(5):  # frozen clock: any wait would hang
        dispatch(c, clock=FakeClock()).admit()
    assert info.value.status == 429 and info.value.code == "overloaded" and info.value.headers["Retry-After"]


def test_queued_request_is_admitted_when_room_appears() -> None:
    c = FakeCluster({"r1": ok}, capacity=1, queue_size=4, queue_timeout=2.0)
    clock = FakeClock()
    busy = dispatch(c, rid="busy", clock=clock)
    busy.admit()
    # once the waiter is queued, 0.05 s pass and busy's stream ends: the release wakes the queue
    when(lambda: len(c.q) == 1, lambda: (clock.advance(0.05), busy.close()))
    d = dispatch(c, rid="waiter", clock=clock)
    d.admit()
    assert d.stream.replica_id == "r1" and c.sent == ["r1", "r1"]
    assert d.queued_s == pytest.approx(0.05) and len(c.q) == 0


def test_queued_request_times_out_with_429() -> None:
    c = FakeCluster({"r1": ok}, capacity=0, queue_size=4, queue_timeout=0.1)
    clock = FakeClock(step=0.05)
    with pytest.raises(Overloaded) as info:
        dispatch(c, clock=clock).admit()
    assert clock.now >= 0.1  # it gave up only once the queue timeout had passed
    assert "stayed busy" in info.value.message and len(c.q) == 0


def test_queue_full_rejects_newcomers_at_once_and_keeps_fifo_order() -> None:
    c = FakeCluster({"r1": ok}, capacity=0, queue_size=2, queue_timeout=1.0)
    clock = FakeClock()  # frozen: the waiters stay queued until room appears
    order: list[str] = []

    def wait(name: str) -> None:
        d = dispatch(c, rid=name, clock=clock)
        d.admit()
        order.append(name)

    waiters = [gevent.spawn(wait, "a")]
    when(lambda: len(c.q) == 1, lambda: waiters.append(gevent.spawn(wait, "b"))).join(timeout=2)
    when(lambda: len(c.q) == 2, lambda: None).join(timeout=2)
    assert len(c.q) == 2
    with pytest.raises(Overloaded), gevent.Timeout(5):  # at once: the frozen clock would hang a wait
        dispatch(c, rid="c", clock=clock).admit()
    c.free["r1"] = 2
    c.q.wake_first()
    gevent.joinall(waiters, timeout=2)
    assert order == ["a", "b"]


def test_client_gone_while_queued_leaves_the_queue() -> None:
    c = FakeCluster({"r1": ok}, capacity=0, queue_size=4, queue_timeout=2.0)
    gone = {"now": False}
    gevent.spawn_later(0.05, gone.__setitem__, "now", True)
    with pytest.raises(ClientGone):
        dispatch(c, client_gone=lambda: gone["now"], clock=FakeClock()).admit()  # frozen: no timeout first
    assert len(c.q) == 0
