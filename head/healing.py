"""When the head tries a failed deployment's replica again, and where not. Pure logic, no sockets.

Runs in the head process, used by head.cluster; every method takes `now` so tests fake time.

An agent gives up on a replica (state `failed`: it crashed too often, or its engine cannot load) after
its own restarts. The head then unassigns it and places a replacement after a backoff that doubles
with each failure of the deployment (base 2 s, at most 2 min), preferring agents where it has not
failed. The count starts over when a replica placed after the last failure becomes ready, or when the
deployment's spec changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Failures:
    count: int
    replica_id: str
    agent_id: str
    message: str
    failed_at: float
    next_try_at: float
    agents: set[str] = field(default_factory=set)  # where replicas of it failed


class Healer:
    def __init__(self, base: float = 2.0, maximum: float = 120.0) -> None:
        self.base = base
        self.maximum = maximum
        self.failures: dict[str, Failures] = {}

    def failed(self, deployment: str, replica_id: str, agent_id: str, message: str, now: float) -> float:
        """Record a failed replica; returns the delay before the next one is placed."""
        old = self.failures.get(deployment)
        count = old.count + 1 if old else 1
        delay = min(self.base * float(2 ** (count - 1)), self.maximum)
        agents = (old.agents if old else set()) | {agent_id}
        self.failures[deployment] = Failures(count, replica_id, agent_id, message, now, now + delay, agents)
        return delay

    def waiting(self, deployment: str, now: float) -> Optional[str]:
        """Why no replacement is placed yet, or None when one may be."""
        f = self.failures.get(deployment)
        if f is None or now >= f.next_try_at:
            return None
        return "retrying in %.0fs (failure %d: replica %s on %s: %s)" % (
            f.next_try_at - now, f.count, f.replica_id, f.agent_id, f.message)

    def avoid(self, deployment: str) -> set[str]:
        f = self.failures.get(deployment)
        return f.agents if f else set()

    def ready(self, deployment: str, placed_at: float) -> None:
        """A replica of the deployment is ready: if it was placed after the last failure, start over."""
        f = self.failures.get(deployment)
        if f is not None and placed_at > f.failed_at:
            del self.failures[deployment]

    def reset(self, deployment: str) -> None:
        self.failures.pop(deployment, None)

    def describe(self, deployment: str, now: float) -> str:
        f = self.failures.get(deployment)
        if f is None:
            return ""
        when = "next try in %.0fs" % (f.next_try_at - now) if now < f.next_try_at else "replacement placed"
        return "%d failure(s); last: replica %s on %s: %s; %s" % (f.count, f.replica_id, f.agent_id,
                                                                 f.message, when)
