"""How many replicas an autoscaled deployment should have. Pure logic, no sockets.

Runs in the head process (head.server drives it every housekeeping tick); `decide` takes `now`, so
tests fake time. Never changes a deployment itself: the head applies the decision through the same
path as `tokenrelay scale` (persisted, placement-checked).

Rule, after Ray Serve's autoscaling policy: the wanted count is ceil(ongoing requests / target per
replica), clamped to [min_replicas, max_replicas]. It must stay above the current count for
`upscale_delay_s` (below it for `downscale_delay_s`) before the count moves, so a short burst or a
short lull changes nothing and a flapping load never scales down. Better than scaling blindly:
- never up into a placement that cannot succeed: `fits(n)` caps the count at what the agents can run;
- never up while the deployment's replicas are failing (head.healing backs off): more failing
  replicas help nobody;
- never a second step up, nor down, while replicas are still starting (they will take load).
Scale to zero (`min_replicas: 0`): with no replica, requests wait in the proxies (up to
`cold_start_timeout_s`), which tell the head (protocol.ScaleDemand); those `waiting` requests count as
load, and 0 -> 1 happens at once (the requests are already waiting: no upscale delay). Back to 0 after
`downscale_delay_s` with no request ongoing or waiting.
TTFT objective (`target_ttft_p90_s`): while the replicas' TTFT p90 (the worst ready replica's, over its
last window, protocol.ReplicaStatus.ttft_p90_s) is above it, one more replica is wanted than there are,
even when ongoing requests are under target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from runtime.stack_config import AutoscalingConfig

__all__ = ["Autoscaler", "AutoscalingConfig", "Decision", "ProxyDemand", "DEMAND_WINDOW"]

DEMAND_WINDOW = 3.0  # seconds a proxy's ScaleDemand counts (they resend every second while requests wait)


@dataclass(frozen=True)
class Decision:
    replicas: int  # what the deployment should have now
    wanted: int  # what the load asks for (before delays and capacity)
    reason: str


class Autoscaler:
    """One per autoscaled deployment; remembers since when the load has asked for a change."""

    def __init__(self, config: AutoscalingConfig) -> None:
        self.config = config
        self._direction = 0  # +1 the load has asked for more since _since, -1 for fewer, 0 neither
        self._since = 0.0
        self.last: Optional[Decision] = None

    def decide(self, now: float, current: int, ongoing: int, ready: int, starting: int,
               failing: bool = False, fits: Callable[[int], bool] = lambda n: True,
               waiting: int = 0, ttft_p90: Optional[float] = None) -> Decision:
        """`current`: the deployment's replica count; `ongoing`: requests running or waiting on its ready
        replicas; `ready`/`starting`: its replicas by state; `failing`: head.healing is backing off;
        `fits(n)`: whether n replicas can be placed; `waiting`: requests proxies hold for want of any
        replica (recent ScaleDemand); `ttft_p90`: the ready replicas' TTFT p90 in seconds (None: unknown)."""
        c = self.config
        wanted = max(c.min_replicas, min(c.max_replicas,
                                         math.ceil((ongoing + waiting) / c.target_ongoing_requests)))
        load = "%d ongoing on %d ready (target %g each)" % (ongoing, ready, c.target_ongoing_requests)
        if waiting:
            load += ", %d waiting for a replica" % waiting
        slow = (c.target_ttft_p90_s is not None and ttft_p90 is not None and ready > 0
                and ttft_p90 > c.target_ttft_p90_s)
        if ttft_p90 is not None and c.target_ttft_p90_s is not None:
            load += ", TTFT p90 %.3fs (objective %gs)" % (ttft_p90, c.target_ttft_p90_s)
        if slow:
            wanted = max(wanted, min(c.max_replicas, current + 1))
        direction = (wanted > current) - (wanted < current)
        if direction != self._direction:
            self._direction, self._since = direction, now
        held = now - self._since
        if current < c.min_replicas or current > c.max_replicas:
            return self._done(Decision(max(c.min_replicas, min(c.max_replicas, current)), wanted,
                                       "outside [min_replicas, max_replicas]"))
        if direction == 0:
            return self._done(Decision(current, wanted, "steady: %s" % load))
        if direction > 0:
            if failing:
                return self._done(Decision(current, wanted, "holding: replicas are failing; %s" % load))
            if starting:  # the last step up is not serving yet; its replicas will take load
                return self._done(Decision(current, wanted, "holding: %d replica(s) starting; %s"
                                           % (starting, load)))
            if held < c.upscale_delay_s and current > 0:  # from zero: requests wait already, start now
                return self._done(Decision(current, wanted, "up to %d in %.0fs unless the load drops: %s"
                                           % (wanted, c.upscale_delay_s - held, load)))
            target = wanted
            while target > current and not fits(target):
                target -= 1
            if target == current:
                return self._done(Decision(current, wanted, "capacity: %d wanted, no room for more; %s"
                                           % (wanted, load)))
            why = "scaled up: %s" % load if target == wanted else \
                "scaled up to %d of %d wanted (capacity): %s" % (target, wanted, load)
            return self._done(Decision(target, wanted, why))
        if starting:
            return self._done(Decision(current, wanted, "holding: %d replica(s) starting; %s" % (starting, load)))
        if held < c.downscale_delay_s:
            return self._done(Decision(current, wanted, "down to %d in %.0fs unless the load rises: %s"
                                       % (wanted, c.downscale_delay_s - held, load)))
        return self._done(Decision(wanted, wanted, "scaled down: %s" % load))

    def _done(self, decision: Decision) -> Decision:
        self.last = decision
        return decision


class ProxyDemand:
    """Requests proxies hold for want of any replica (their ScaleDemand), per (proxy, deployment); each
    report counts for DEMAND_WINDOW seconds. At most `limit` entries: a flood of reports cannot grow it."""

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._reports: dict[tuple[bytes, str], tuple[float, int]] = {}  # -> (when, waiting)

    def __len__(self) -> int:
        return len(self._reports)

    def note(self, proxy: bytes, deployment: str, waiting: int, now: float) -> None:
        if len(self._reports) < self._limit:
            self._reports[(proxy, deployment)] = (now, max(0, waiting))

    def waiting(self, now: float) -> dict[str, int]:
        """Requests waiting per deployment, summed over proxies; older reports are forgotten."""
        totals: dict[str, int] = {}
        for key, (at, count) in list(self._reports.items()):
            if now - at > DEMAND_WINDOW:
                del self._reports[key]
            else:
                totals[key[1]] = totals.get(key[1], 0) + count
        return totals
