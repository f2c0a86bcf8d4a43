"""Routing-table state of one proxy worker: which table to apply, when it is stale, readiness.

Pure logic (Clone pattern from the zguide, plus epoch and gap detection); runs inside each proxy worker;
owns no socket and never reads the clock itself: every method takes `now` (monotonic seconds).

Rules for an offered table (from the SUB or a snapshot reply):
  * no table yet                         -> apply
  * epoch differs from ours (new head)   -> apply, and ask for a snapshot (resync)
  * same epoch, version <= ours          -> ignore; an equal version (the head's periodic republish)
                                            still counts as fresh
  * same epoch, version == ours + 1      -> apply
  * same epoch, version  > ours + 1      -> gap: apply (tables are always whole) and resync
A table is stale when none was applied or refreshed for `stale_after` seconds. Routing goes on with the
last table, and /ready stays 200 (saying the table is stale) while the worker still has a replica it can
reach: the head being down is a control-plane outage, and must not make load balancers pull every proxy
out. Not ready: no table, no deployment with a healthy replica, or no replica of the table this worker
reaches (connected, and not refusing the proxy's key), whether the table is fresh or stale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from runtime.protocol import DeploymentRoute, RoutingTable


@dataclass(frozen=True)
class Offer:
    applied: bool
    resync: bool  # ask the head for a snapshot
    reason: str  # "first", "next", "gap", "new epoch", "republish", "old"


class TableState:
    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self.table: Optional[RoutingTable] = None
        self._by_name: dict[str, DeploymentRoute] = {}
        self._fresh_at: Optional[float] = None
        self._stale_reported = False

    def offer(self, table: RoutingTable, now: float) -> Offer:
        cur = self.table
        if cur is None:
            return self._apply(table, now, resync=False, reason="first")
        if table.epoch != cur.epoch:
            return self._apply(table, now, resync=True, reason="new epoch")
        if table.version == cur.version:
            self._fresh_at = now
            return Offer(False, False, "republish")
        if table.version < cur.version:
            return Offer(False, False, "old")
        if table.version == cur.version + 1:
            return self._apply(table, now, resync=False, reason="next")
        return self._apply(table, now, resync=True, reason="gap")

    def _apply(self, table: RoutingTable, now: float, *, resync: bool, reason: str) -> Offer:
        self.table = table
        self._by_name = {d.name: d for d in table.deployments}
        self._fresh_at = now
        return Offer(True, resync, reason)

    def deployment(self, name: str) -> Optional[DeploymentRoute]:
        return self._by_name.get(name)

    def deployments(self) -> list[DeploymentRoute]:
        return list(self._by_name.values())

    def age(self, now: float) -> Optional[float]:
        """Seconds since a table was last applied or refreshed; None before the first."""
        return None if self._fresh_at is None else max(0.0, now - self._fresh_at)

    def is_stale(self, now: float) -> bool:
        age = self.age(now)
        return age is None or age > self.stale_after

    def staleness_change(self, now: float) -> Optional[Literal["stale", "fresh"]]:
        """"stale" once when a table goes stale, "fresh" once when it recovers, else None.

        Lets the caller log one warning per stale period instead of one per poll.
        """
        if self.table is None:
            return None
        stale = self.is_stale(now)
        if stale and not self._stale_reported:
            self._stale_reported = True
            return "stale"
        if not stale and self._stale_reported:
            self._stale_reported = False
            return "fresh"
        return None

    def readiness(self, now: float, reachable: Optional[int] = None) -> tuple[bool, str]:
        """(ready, reason) for GET /ready; reason "ok" when all is well. `reachable`: replicas of the
        table this worker is connected to (None: unknown, counted as none when the table is stale)."""
        if self.table is None:
            return False, "no routing table received from the head yet"
        if not any(d.replicas or d.cold_start_timeout_s > 0 for d in self.table.deployments):
            return False, "no deployment has a healthy replica"
        if self.is_stale(now):
            stale = "routing table is stale: none received for %.1fs (limit %.1fs)" % (
                self.age(now) or 0.0, self.stale_after)
            if not reachable:
                return False, stale + ", and no replica of it is reachable"
            return True, stale + "; serving with the last table (%d replica(s) reachable)" % reachable
        if reachable == 0 and not any(d.cold_start_timeout_s > 0 for d in self.table.deployments):
            return False, ("no replica of the routing table is reachable from this worker (still connecting, "
                           "or every one refuses this proxy's key: see the proxy's log)")
        return True, "ok"
