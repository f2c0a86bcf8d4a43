"""What one replica connection of a proxy worker makes of its DEALER's handshake events.

Pure logic; runs in proxy workers (proxy/replicas.py ReplicaConnection's watcher greenlet feeds it the
socket monitor's events); owns no socket, never sleeps or reads the clock.

What libzmq (4.3, bundled with the pinned pyzmq; tests/component/test_proxy_replica_handshake.py fails
if that changes) reports on the connecting side, per connection attempt: EVENT_CONNECTED (TCP only),
then EVENT_HANDSHAKE_SUCCEEDED (with CURVE and with the NULL mechanism alike) or one of:
  * HANDSHAKE_FAILED_AUTH (value: the ZAP status code; 400: the replica's host does not list our key)
    and HANDSHAKE_FAILED_PROTOCOL (value: a ZMQ_PROTOCOL_ERROR_* code; e.g. CURVE on one side only):
    libzmq ends that connection for good and never reconnects it: only a new socket tries again, so
    the connection is reopened (`reopen_in`) after a backoff, until a key copied later is accepted;
  * HANDSHAKE_FAILED_NO_DETAIL (value: an errno; e.g. the replica drops us because our copy of its
    public key is wrong): libzmq reconnects by itself.
Either way the replica is not routable from this worker until a handshake succeeds. Each streak of
failures is reported once (`warn`), and again only when its kind changes, not at every retry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import zmq

from proxy.backoff import Backoff

REOPEN_INITIAL_S = 0.5  # first retry after the replica refused us; doubles up to REOPEN_MAX_S
REOPEN_MAX_S = 5.0  # a key copied to the replica's host is picked up within this long

REFUSED, PROTOCOL, DROPPED = "refused", "protocol", "dropped"  # Failure.kind (and the metric's label)
_KINDS: dict[int, str] = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: REFUSED, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: PROTOCOL,
                          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: DROPPED}
FAILED_EVENTS = frozenset(_KINDS)


@dataclass(frozen=True)
class Failure:
    kind: str  # REFUSED, PROTOCOL or DROPPED
    reason: str  # for the log line: what happened and what to check
    reopen_in: Optional[float]  # seconds until a new socket must try again; None: libzmq retries itself
    warn: bool  # first failure of a streak (or a new kind of failure): log it


def describe(kind: str, value: int) -> str:
    if kind == REFUSED:
        return ("refused this proxy's key (ZAP status %d): is registry/proxy-NAME.key on the replica's host? "
                "(docs/operations.md, a proxy added later)" % value)
    if kind == PROTOCOL:
        return ("broke off the handshake (ZMTP protocol error 0x%x): CURVE on one side only, or the endpoint "
                "is not a replica's data socket?" % value)
    return ("closed the connection during the handshake (%s): is our copy of replica.key (the replicas' "
            "public key) the cluster's?" % _errno_name(value))


def _errno_name(value: int) -> str:
    try:
        return zmq.strerror(value) if value else "no error code"
    except Exception:  # an errno libzmq does not know
        return "errno %d" % value


class Handshakes:
    """Handshake outcomes of one replica connection: failure streaks and the reopen backoff."""

    def __init__(self, initial: float = REOPEN_INITIAL_S, maximum: float = REOPEN_MAX_S) -> None:
        self._backoff = Backoff(initial, maximum)
        self.failures = 0  # failed handshakes since the last one that succeeded
        self._last_kind: Optional[str] = None

    def succeeded(self) -> int:
        """A handshake succeeded: the streak ends. Returns how many failures it had."""
        failures = self.failures
        self.failures = 0
        self._last_kind = None
        self._backoff.reset()
        return failures

    def failed(self, event: int, value: int) -> Failure:
        """A HANDSHAKE_FAILED_* event (FAILED_EVENTS) with its value."""
        kind = _KINDS[event]
        warn = kind != self._last_kind
        self.failures += 1
        self._last_kind = kind
        reopen_in = None if kind == DROPPED else self._backoff.next()
        return Failure(kind, describe(kind, value), reopen_in, warn)
