"""Who may send requests on the replica's data socket, once CURVE is on (a key directory is configured).

Runs in model_proc. `DataAccess` starts the ZAP thread on the replica's ZeroMQ context, which vets every
connection to the data ROUTER (proxy keys only: runtime.authz.REPLICA_DATA), and the receive loop asks
it about each GenerateRequest: ZAP vetted the key at connect time, but a proxy key revoked (or removed)
on this host since then must not keep generating on the connection it opened before.
Owns no socket of its own beyond the ZAP thread's (runtime.zap). Every refusal is counted in
tokenrelay_replica_auth_refused_total and logged (rate-limited: runtime.zap.RefusalLog).
"""
from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.asyncio

from model_proc import metrics
from runtime.keyring import Registry
from runtime.zap import RefusalLog, ZapHandler, recheck

log = logging.getLogger(__name__)

_REFUSAL_LOG = RefusalLog(log)


def _refused(role: str, reason: str, who: str) -> None:
    """Count and log one refusal (called from the ZAP thread and from the loop)."""
    _REFUSAL_LOG(who, reason)
    metrics.AUTH_REFUSED.labels(role, reason).inc()


class DataAccess:
    """The ZAP thread of the data socket, and the per-request re-check of the sender's key."""

    def __init__(self, ctx: zmq.asyncio.Context, keys: Path) -> None:
        self._registry = Registry(keys)
        self._zap = ZapHandler(zmq.Context.shadow(ctx.underlying), self._registry, _refused).start()

    def refusal(self, user: str, request_id: str) -> str:
        """"" if the key behind `user` (the connection's ZAP User-Id) is still a registered proxy key, else
        the reason (counted and logged)."""
        sender, reason = recheck(self._registry, user)
        if not reason and sender is not None and sender.role != "proxy":
            reason = "role"
        if reason:
            _refused(sender.role if sender is not None else "unknown", reason,
                     "%s request %s" % (sender.label if sender is not None else "an unknown key", request_id))
        return reason

    def stop(self) -> None:
        self._zap.stop()
