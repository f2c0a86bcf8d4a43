"""When the head publishes a routing table, and with which (epoch, version). Pure logic, no sockets.

Runs in the head process. The epoch changes with every head start (milliseconds of the start time, so
it grows across restarts); the version grows with every change of content inside an epoch. Proxies
ignore older versions and resync on a gap or a new epoch.
"""
from __future__ import annotations

from typing import Optional

from runtime.protocol import DeploymentRoute, RoutingTable


class TableVersions:
    def __init__(self, epoch: int, republish_interval: float = 1.0) -> None:
        self.epoch = epoch
        self.version = 0
        self.republish_interval = republish_interval
        self._content: Optional[list[DeploymentRoute]] = None
        self._last_published = float("-inf")
        self.current: Optional[RoutingTable] = None

    def force_next(self) -> None:
        """Publish at the next update whatever the content (the publisher was just bound again)."""
        self._last_published = float("-inf")

    def update(self, routes: list[DeploymentRoute], now: float, wall_time: float = 0.0
               ) -> Optional[RoutingTable]:
        """Return a table to publish now (content changed, or the republish interval passed), else None."""
        changed = routes != self._content
        if changed:
            self._content = routes
            self.version += 1
        if changed or now - self._last_published >= self.republish_interval:
            self._last_published = now
            self.current = RoutingTable(self.epoch, self.version, wall_time, routes)
            return self.current
        return None
