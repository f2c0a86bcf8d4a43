"""Lifecycle of one supervised replica: states, restart backoff, liveness. Pure logic, no sockets.

Runs in the agent process; every method takes `now` so tests fake time. Never starts or signals a
process itself: the agent's reactor does that when these records say so.

    STARTING --status(ready)--> READY --silent/stuck--> UNHEALTHY --status--> READY
        |                         |                         |
        +--------exit------------+-------------------------+--> BACKOFF --delay--> STARTING
                                                                   |
                                   repeated crashes / load errors  +--> FAILED (not restarted)
    any --stop()--> STOPPING --exit--> (removed)
    READY --planned_restart (re-pin to fewer cores)--> BACKOFF --stopped_for_restart--> STARTING
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from model_proc.config import EXIT_LOAD_ERROR, EXIT_USAGE
from runtime.protocol import ReplicaReport, ReplicaSpec, ReplicaState, ReplicaStatus


@dataclass(frozen=True)
class RestartPolicy:
    backoff_base: float = 0.5       # first restart delay; doubles per crash
    backoff_max: float = 30.0
    crash_window: float = 60.0      # crashes counted over this window ...
    max_crashes: int = 5            # ... more than this and the replica is FAILED
    max_load_errors: int = 2        # exit code 3 (engine cannot load) this often: FAILED
    startup_timeout: float = 600.0  # STARTING longer than this: killed and restarted
    liveness_timeout: float = 2.0   # READY and no status for this long: UNHEALTHY
    stuck_timeout: float = 10.0     # requests pending and no engine progress this long: UNHEALTHY


@dataclass
class ReplicaRecord:
    spec: ReplicaSpec
    policy: RestartPolicy
    state: ReplicaState = ReplicaState.BACKOFF
    pid: int = 0
    endpoint: str = ""
    restarts: int = 0
    started_at: float = 0.0
    next_start_at: float = 0.0
    last_status: Optional[ReplicaStatus] = None
    last_status_at: float = 0.0
    progress_at: float = 0.0
    message: str = ""
    last_exit_code: Optional[int] = None
    crash_times: list[float] = field(default_factory=list)
    load_errors: int = 0  # exits with a load error since it was last ready
    waiting_for: tuple[str, ...] = ()  # stopping replicas that hold the devices it would start on

    @property
    def replica_id(self) -> str:
        return self.spec.replica_id

    def should_start(self, now: float) -> bool:
        return self.state == ReplicaState.BACKOFF and now >= self.next_start_at

    def launched(self, pid: int, now: float) -> None:
        self.state = ReplicaState.STARTING
        self.pid = pid
        self.endpoint = ""
        self.started_at = now
        self.last_status = None
        self.last_status_at = now
        self.progress_at = now

    def hello(self, endpoint: str, now: float) -> None:
        self.endpoint = endpoint
        self.last_status_at = now

    def status(self, st: ReplicaStatus, now: float) -> bool:
        """Record a status report (the replica's heartbeat). Returns True if the state changed."""
        prev = self.last_status
        if prev is None or st.steps != prev.steps or st.running + st.waiting == 0:
            self.progress_at = now
        self.last_status = st
        self.last_status_at = now
        if self.state in (ReplicaState.STARTING, ReplicaState.UNHEALTHY) and st.ready:
            self.state = ReplicaState.READY
            self.message = ""
            self.load_errors = 0  # it loads: an earlier load error (a GPU still busy, say) was passing
            return True
        if self.state == ReplicaState.READY and not st.ready:  # draining
            self.state = ReplicaState.UNHEALTHY
            self.message = "replica reports not ready"
            return True
        return False

    def check(self, now: float) -> tuple[bool, bool]:
        """Liveness pass. Returns (state changed, must be killed)."""
        p = self.policy
        if self.state == ReplicaState.STARTING and now - self.started_at > p.startup_timeout:
            self.message = "not ready after %.0fs" % p.startup_timeout
            return False, True
        if self.state == ReplicaState.READY:
            if now - self.last_status_at > p.liveness_timeout:
                self.state = ReplicaState.UNHEALTHY
                self.message = "no status for %.1fs" % (now - self.last_status_at)
                return True, False
            st = self.last_status
            if st is not None and st.running + st.waiting > 0 and now - self.progress_at > p.stuck_timeout:
                self.state = ReplicaState.UNHEALTHY
                self.message = "requests pending and no progress for %.1fs" % (now - self.progress_at)
                return True, False
        return False, False

    def exited(self, code: int, now: float) -> None:
        """The process ended without being asked to: back off and restart, or give up."""
        self.last_exit_code = code
        self.pid = 0
        self.endpoint = ""
        self.last_status = None
        p = self.policy
        self.crash_times = [t for t in self.crash_times if now - t <= p.crash_window] + [now]
        if code in (EXIT_LOAD_ERROR, EXIT_USAGE):
            self.load_errors += 1
        if self.load_errors >= p.max_load_errors:
            self.state = ReplicaState.FAILED
            self.message = "engine cannot start (exit %d, %d times); not restarting" % (code, self.load_errors)
            return
        if len(self.crash_times) > p.max_crashes:
            self.state = ReplicaState.FAILED
            self.message = "%d crashes within %.0fs; not restarting" % (len(self.crash_times), p.crash_window)
            return
        delay = min(p.backoff_base * 2 ** (len(self.crash_times) - 1), p.backoff_max)
        self.state = ReplicaState.BACKOFF
        self.next_start_at = now + delay
        self.restarts += 1
        self.message = "exited with code %d; restarting in %.1fs" % (code, delay)

    def wait_for_devices(self, holders: list[str]) -> bool:
        """Due to start, but stopping replicas' processes still hold the devices it would get (the agent
        starts it once `holders` is empty); said in its message. True if that changed."""
        if tuple(holders) == self.waiting_for:
            return False
        self.waiting_for = tuple(holders)
        self.message = "waiting for stopping replica(s) %s to free their devices" % ", ".join(holders) \
            if holders else ""
        return True

    def planned_restart(self, message: str) -> None:
        """The agent restarts it on purpose (a new core set): out of routing now, started again once its
        old process is gone (`stopped_for_restart`); never counted as a crash."""
        self.state = ReplicaState.BACKOFF
        self.next_start_at = float("inf")
        self.message = message

    def stopped_for_restart(self, now: float) -> None:
        if self.state == ReplicaState.BACKOFF and self.next_start_at == float("inf"):
            self.next_start_at = now
            self.pid = 0
            self.endpoint = ""
            self.last_status = None

    def report(self, wall_offset: float = 0.0) -> ReplicaReport:
        """`wall_offset` turns this record's clock into wall time (other hosts read started_at)."""
        return ReplicaReport(
            replica_id=self.replica_id, deployment=self.spec.deployment, state=self.state,
            endpoint=self.endpoint, pid=self.pid, restarts=self.restarts,
            started_at=self.started_at + wall_offset if self.started_at else 0.0,
            message=self.message, status=self.last_status, generation=self.spec.generation)
