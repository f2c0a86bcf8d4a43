"""runtime.zap.RefusalLog: refusals are logged without letting a peer flood the log (no sockets)."""
import logging

import pytest

from runtime.zap import RefusalLog

pytestmark = pytest.mark.unit


def lines(caplog):
    return [r.getMessage() for r in caplog.records]


def test_one_peer_retrying_is_logged_a_few_times_then_summed_up(caplog):
    now = [0.0]
    refusals = RefusalLog(logging.getLogger("t"), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for _ in range(600):  # one key connecting again and again for a minute
            refusals("key AbCdEfGh on control", "unknown_key")
            now[0] += 0.1
        refusals("proxy-edge on publish", "revoked")  # a new window: logged, after the sum of the last one
    assert lines(caplog) == ["[auth] refused key AbCdEfGh on control: unknown_key"] * RefusalLog.PER_PEER + [
        "[auth] %d more refusal(s) in the last 60s not logged (see the auth_refused_total metric)"
        % (600 - RefusalLog.PER_PEER), "[auth] refused proxy-edge on publish: revoked"]


def test_fresh_keys_cannot_write_without_bound(caplog):
    refusals = RefusalLog(logging.getLogger("t"), clock=lambda: 0.0)
    with caplog.at_level(logging.WARNING):
        for n in range(10_000):
            refusals("key %08d on control" % n, "unknown_key")
    assert len(lines(caplog)) == RefusalLog.TOTAL
