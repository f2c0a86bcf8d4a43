"""Replica choice for one request: power of two choices by load, prefix and session affinity.

Pure logic, runs inside each proxy worker; owns no socket, never does I/O or reads the clock (callers
pass `now`). The RNG is injected so tests are deterministic.

A candidate is described by a ReplicaView: the replica's own reported load (requests it holds, from
every proxy worker: piggybacked on its TokenBatches and pushed on change, else the routing table) and
this worker's in-flight requests to it. The load a worker counts for a replica (`estimated_load`):

    load = max(reported, mine sent before the report) + mine sent after the report

so requests this worker sent since the report are never forgotten, and other workers' requests are
known as of the report. Capacity is split between the proxy's `workers`, which all act on the same
reports: between two reports a worker sends a replica at most its share of what was free at the
report, ceil((max_ongoing_requests - load at the report) / workers). Acting on one report, all workers
together send at most free + workers - 1, so a replica holds at most its limit plus workers - 1 (per
proxy), plus what races a report on the wire (reports come with every TokenBatch and are pushed within
25 ms of a change, so that window is short; docs/api.md gives the measured overshoot).

Choice (`Router.choose`), over the replicas that are usable (not down, breaker closed or probing, not
already tried by this request):
  * none usable                           -> NONE (the caller answers 503), or DOWN when some are
                                             listed but every one is down or ejected right now (their
                                             processes restarting: the caller waits, like FULL, then 503)
  * with room: fresh reports first; a report older than `stale_after` is only used when no fresh
    replica has room
  * no replica with room                  -> FULL (the caller queues, then 429)
  * a key (X-Session-ID, or the prompt prefix under the prefix policy) picks its replica by rendezvous
    hashing over the usable replicas (consistent: only the keys of a replica that leaves move); it is
    taken when it has room and its load <= the least loaded candidate's + max_imbalance
  * otherwise power of two choices: two random candidates, the less loaded wins
Connected replicas are preferred over ones still connecting, so one that never comes up eats nothing.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Collection, Optional, Sequence

from runtime.protocol import StrEnum

class Outcome(StrEnum):
    ROUTE = "route"
    FULL = "full"
    NONE = "none"
    DOWN = "down"


ROUTE, FULL, NONE, DOWN = Outcome.ROUTE, Outcome.FULL, Outcome.NONE, Outcome.DOWN  # the names callers import


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    max_ongoing: int
    reported: int = 0  # requests the replica said it holds (all proxies)
    reported_at: float = float("-inf")  # when that report was made, on this worker's clock
    mine: int = 0  # this worker's requests in flight to it
    mine_since_report: int = 0  # of those, sent after the report was made
    connected: bool = True  # False: still connecting (never seen EVENT_CONNECTED)
    down: bool = False  # disconnected or said ReplicaDead
    allowed: bool = True  # the circuit breaker lets a request through


@dataclass(frozen=True)
class Policy:
    name: str = "p2c"  # "p2c" or "prefix"
    max_imbalance: int = 8
    stale_after: float = 3.0
    workers: int = 1  # proxy workers sharing each replica's free capacity


@dataclass(frozen=True)
class Decision:
    outcome: Outcome  # ROUTE, FULL, NONE or DOWN
    replica_id: Optional[str] = None
    how: str = ""  # "p2c", "key", "single": for logs and metrics


def estimated_load(v: ReplicaView) -> int:
    before = max(0, v.mine - v.mine_since_report)
    return max(v.reported, before) + v.mine_since_report


def has_room(v: ReplicaView, workers: int = 1) -> bool:
    """This worker may send one more: its sends since the report are below its share of the capacity
    that was free at the report (the whole of it when it is the only worker)."""
    at_report = max(v.reported, v.mine - v.mine_since_report)
    free = v.max_ongoing - at_report
    share = -(-free // max(1, workers)) if free > 0 else 0  # ceil
    return v.mine_since_report < share


def key_score(key_digest: bytes, replica_id: str) -> int:
    """Rendezvous (highest random weight) score of a replica for a key."""
    h = hashlib.blake2b(key_digest, digest_size=8, key=replica_id.encode()[:64])
    return int.from_bytes(h.digest(), "big")


def key_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Router:
    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, views: Sequence[ReplicaView], policy: Policy, now: float, key: Optional[str] = None,
               exclude: Collection[str] = ()) -> Decision:
        candidates = [v for v in views if v.replica_id not in exclude]
        usable = [v for v in candidates if not v.down and v.allowed]
        usable = [v for v in usable if v.connected] or usable
        if not usable:
            return Decision(DOWN if candidates else NONE)
        roomy = [v for v in usable if has_room(v, policy.workers)]
        if not roomy:
            return Decision(FULL)
        fresh = [v for v in roomy if now - v.reported_at <= policy.stale_after]
        pool = fresh or roomy
        if key is not None:
            target = self._by_key(usable, key)
            least = min(estimated_load(v) for v in pool)
            if has_room(target, policy.workers) and estimated_load(target) <= least + policy.max_imbalance:
                return Decision(ROUTE, target.replica_id, "key")
        return self._p2c(pool)

    @staticmethod
    def _by_key(usable: Sequence[ReplicaView], key: str) -> ReplicaView:
        digest = key_digest(key)
        return max(usable, key=lambda v: (key_score(digest, v.replica_id), v.replica_id))

    def _p2c(self, pool: Sequence[ReplicaView]) -> Decision:
        if len(pool) == 1:
            return Decision(ROUTE, pool[0].replica_id, "single")
        a, b = self._rng.sample(list(pool), 2)
        la, lb = estimated_load(a), estimated_load(b)
        if la == lb:  # ties: prefer the one with fewer of this worker's own requests, then either
            pick = a if (a.mine, self._rng.random()) <= (b.mine, 0.5) else b
        else:
            pick = a if la < lb else b
        return Decision(ROUTE, pick.replica_id, "p2c")


def route_key(policy_name: str, prefix_chars: int, session_affinity: bool, session_id: Optional[str],
              prompt: str) -> Optional[str]:
    """The affinity key of a request: its session id when affinity is on, else under the prefix policy
    the first `prefix_chars` characters of the rendered prompt, else None (plain power of two)."""
    if session_affinity and session_id:
        return "session:" + session_id
    if policy_name == "prefix" and prompt:
        return "prefix:" + prompt[:prefix_chars]
    return None
