from agent.lifecycle import ReplicaRecord, ReplicaState, RestartPolicy
from model_proc.config import EXIT_CRASH, EXIT_LOAD_ERROR
from runtime.protocol import ReplicaSpec, ReplicaStatus

SPEC = ReplicaSpec("r1", "d", "mock", "m")


def _status(ready=True, running=0, steps=0):
    return ReplicaStatus("r1", ready, running, 0, 0.0, steps, 0, 0, 0, 0)


def test_ready_only_after_the_replica_says_so():
    rec = ReplicaRecord(SPEC, RestartPolicy())
    assert rec.should_start(0.0)
    rec.launched(100, 0.0)
    assert rec.state == ReplicaState.STARTING
    rec.status(_status(ready=False), 0.1)
    assert rec.state == ReplicaState.STARTING
    assert rec.status(_status(ready=True), 0.2) is True
    assert rec.state == ReplicaState.READY


def test_crash_backs_off_exponentially_then_fails():
    policy = RestartPolicy(backoff_base=1.0, backoff_max=30.0, crash_window=60.0, max_crashes=3)
    rec = ReplicaRecord(SPEC, policy)
    delays = []
    now = 0.0
    for _ in range(3):
        rec.launched(1, now)
        rec.exited(EXIT_CRASH, now)
        assert rec.state == ReplicaState.BACKOFF
        delays.append(rec.next_start_at - now)
        assert not rec.should_start(now)
        now = rec.next_start_at
        assert rec.should_start(now)
    assert delays == [1.0, 2.0, 4.0]
    rec.launched(1, now)
    rec.exited(EXIT_CRASH, now)
    assert rec.state == ReplicaState.FAILED and "crashes" in rec.message
    assert not rec.should_start(now + 1000)


def test_crashes_outside_the_window_are_forgotten():
    rec = ReplicaRecord(SPEC, RestartPolicy(max_crashes=2, crash_window=10.0))
    for t in (0.0, 20.0, 40.0, 60.0):
        rec.launched(1, t)
        rec.exited(EXIT_CRASH, t)
        assert rec.state == ReplicaState.BACKOFF


def test_load_error_is_not_retried_forever():
    rec = ReplicaRecord(SPEC, RestartPolicy(max_load_errors=2))
    rec.launched(1, 0.0)
    rec.exited(EXIT_LOAD_ERROR, 0.0)
    assert rec.state == ReplicaState.BACKOFF
    rec.launched(1, 5.0)
    rec.exited(EXIT_LOAD_ERROR, 5.0)
    assert rec.state == ReplicaState.FAILED and "cannot start" in rec.message


def test_silent_replica_is_unhealthy_and_comes_back():
    rec = ReplicaRecord(SPEC, RestartPolicy(liveness_timeout=2.0))
    rec.launched(1, 0.0)
    rec.status(_status(), 0.5)
    assert rec.check(2.4) == (False, False)
    assert rec.check(2.6) == (True, False)
    assert rec.state == ReplicaState.UNHEALTHY
    rec.status(_status(), 3.0)
    assert rec.state == ReplicaState.READY


def test_stuck_engine_with_pending_requests_is_unhealthy():
    rec = ReplicaRecord(SPEC, RestartPolicy(liveness_timeout=100.0, stuck_timeout=5.0))
    rec.launched(1, 0.0)
    rec.status(_status(running=3, steps=10), 1.0)
    for t in (2.0, 4.0, 6.5):  # heartbeats keep coming but steps do not move
        rec.status(_status(running=3, steps=10), t)
    assert rec.check(6.5) == (True, False)
    assert "no progress" in rec.message


def test_startup_timeout_asks_for_a_kill():
    rec = ReplicaRecord(SPEC, RestartPolicy(startup_timeout=30.0))
    rec.launched(1, 0.0)
    assert rec.check(29.0) == (False, False)
    assert rec.check(31.0) == (False, True)


def test_a_load_error_before_a_successful_start_is_forgotten_once_ready():
    """One spurious load error (a GPU still held by a stopping replica) counted against the replica for
    ever: a second one, weeks later, marked it failed."""
    rec = ReplicaRecord(SPEC, RestartPolicy(max_load_errors=2, crash_window=60.0))
    rec.launched(1, 0.0)
    rec.exited(EXIT_LOAD_ERROR, 0.0)
    assert rec.state == ReplicaState.BACKOFF
    rec.launched(2, rec.next_start_at)
    rec.status(_status(ready=True), 5.0)
    rec.launched(3, 10_000.0)  # a restart much later ...
    rec.exited(EXIT_LOAD_ERROR, 10_000.0)  # ... that cannot load once
    assert rec.state == ReplicaState.BACKOFF and rec.load_errors == 1
    rec.launched(4, rec.next_start_at)
    rec.exited(EXIT_LOAD_ERROR, 10_001.0)
    assert rec.state == ReplicaState.FAILED  # twice in a row still fails it


def test_waiting_for_devices_is_said_in_the_message_and_cleared():
    rec = ReplicaRecord(SPEC, RestartPolicy())
    assert rec.wait_for_devices([]) is False and rec.message == ""
    assert rec.wait_for_devices(["r0"]) is True
    assert "r0" in rec.report().message and rec.report().state == ReplicaState.BACKOFF
    assert rec.wait_for_devices(["r0"]) is False
    assert rec.wait_for_devices([]) is True and rec.message == ""
