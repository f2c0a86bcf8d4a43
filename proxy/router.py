"""Replica choice for one request: least in-flight (as counted by this worker), random tie-break.

Pure logic, runs inside each proxy worker; owns no socket, never does I/O or reads the clock. The RNG is
injected so tests are deterministic.

Only replicas the routing table lists are candidates (the head lists healthy ones only). Among them a
replica whose connection is known to be down (disconnected, or said ReplicaDead) is skipped, and one
that is connected is preferred over one still connecting, so a replica that never comes up does not eat
requests while others can serve.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: str
    in_flight: int
    connected: bool = True  # False: still connecting (never seen EVENT_CONNECTED)
    down: bool = False  # disconnected or dead: never chosen


class LeastInFlightRouter:
    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, loads: Sequence[ReplicaLoad]) -> Optional[str]:
        """Return the replica_id to use, or None when no candidate can take the request."""
        usable = [r for r in loads if not r.down]
        connected = [r for r in usable if r.connected]
        pool = connected or usable
        if not pool:
            return None
        least = min(r.in_flight for r in pool)
        best = [r for r in pool if r.in_flight == least]
        if len(best) == 1:
            return best[0].replica_id
        return self._rng.choice(best).replica_id
