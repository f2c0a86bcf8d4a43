"""Which replicas to restart on fewer cores, and when: pure, no sockets, no clock of its own.

Runs in the agent process (agent.server drives it). When a new vLLM replica on a CPU host takes cores a
running replica had (agent.devices.devices_for), the two share them until the running one restarts on
its smaller share. That restart waits until another replica of its deployment is ready (the deployment
keeps serving: slower, never an outage), takes one replica at a time, and first takes the replica out
of routing for REPIN_DELAY, so proxies stop sending it requests before it drains.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

from agent.lifecycle import ReplicaRecord
from runtime.protocol import ReplicaState

REPIN_DELAY = 1.0  # a replica re-pinned to fewer cores leaves routing this long before it is stopped


class RepinPlan:
    def __init__(self) -> None:
        self.wanted: set[str] = set()  # running on cores a newer replica was given
        self.stop_at: dict[str, float] = {}  # re-pin under way: out of routing, stop at this time

    def want(self, replica_ids: Iterable[str]) -> None:
        self.wanted.update(replica_ids)

    def forget(self, replica_id: str) -> None:
        self.wanted.discard(replica_id)
        self.stop_at.pop(replica_id, None)

    def due(self, now: float, running: set[str]) -> list[str]:
        """Replicas whose time out of routing is over: stop them now (they start again on their share).
        A replica no longer running is forgotten."""
        out = []
        for replica_id, stop_at in list(self.stop_at.items()):
            if replica_id not in running:
                del self.stop_at[replica_id]
            elif now >= stop_at:
                del self.stop_at[replica_id]
                out.append(replica_id)
        return out

    def pick(self, now: float, records: Mapping[str, ReplicaRecord],
             running: set[str]) -> Optional[tuple[str, str]]:
        """The next replica to take out of routing, with the ready replica of its deployment that keeps
        serving meanwhile; None while a re-pin is under way or no wanted replica has such a peer."""
        if self.stop_at:
            return None
        for replica_id in sorted(self.wanted):
            rec = records.get(replica_id)
            if rec is None or replica_id not in running:
                self.wanted.discard(replica_id)
                continue
            ready = [r.replica_id for r in records.values() if r.spec.deployment == rec.spec.deployment
                     and r.replica_id != replica_id and r.state == ReplicaState.READY]
            if ready:
                self.wanted.discard(replica_id)
                self.stop_at[replica_id] = now + REPIN_DELAY
                return replica_id, ready[0]
        return None
