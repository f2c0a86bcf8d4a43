"""Component test: the real proxy (`python -m proxy`) retries a request refused by one replica on
another, and its circuit breaker ejects the replica that keeps refusing, then probes it again.

Fake head and fake replicas on real ZeroMQ sockets (see test_proxy_fakes.py); the proxy runs with one
worker, a breaker that opens after 2 failures and a 1 s cool-off.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_proxy_fakes import TEXT, FakeHead, FakeReplica, wait_for  # noqa: E402
from test_proxy_server import free_port, start_proxy, stop_proxy  # noqa: E402

from runtime.protocol import DeploymentRoute  # noqa: E402

pytestmark = pytest.mark.timeout(60)

COOLDOWN = 2.0


def send_until(url: str, body: dict, done: Callable[[], bool], limit: int = 60) -> None:
    """Successful requests until `done()` (at most `limit`: p2c picks between equal replicas at random)."""
    for _ in range(limit):
        r = httpx.post(url, json=body, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == TEXT
        if done():
            return
    raise AssertionError("not done after %d requests" % limit)


def test_refusing_replica_is_retried_around_then_ejected_then_probed(tmp_path: Path) -> None:
    bad = FakeReplica("bad", refuse=True).start_and_wait()
    good = FakeReplica("good").start_and_wait()
    head = FakeHead().start_and_wait()
    head.set_deployments([DeploymentRoute("flaky", "fake", "m", [bad.route(), good.route()])])
    port = free_port()
    proc = start_proxy(head.control, port, tmp_path / "proxy.log", tmp_path / "metrics",
                       "--breaker-failures", "2", "--breaker-cooldown", str(COOLDOWN))
    url = "http://127.0.0.1:%d/v1/chat/completions" % port
    body = {"model": "flaky", "messages": [{"role": "user", "content": "hi"}]}
    try:
        # every request succeeds: the ones routed to `bad` first are retried on `good`
        send_until(url, body, lambda: len(bad.requests) == 2)  # p2c picks either while loads are equal
        ejected_at = time.monotonic()
        for _ in range(4):
            assert httpx.post(url, json=body, timeout=10).status_code == 200
        assert time.monotonic() - ejected_at < COOLDOWN  # still within the cool-off...
        assert len(bad.requests) == 2  # ...and nothing more went there
        log = (tmp_path / "proxy.log").read_text()
        assert "ejected for %.1fs" % COOLDOWN in log and "failed before the first token" in log
        # after the cool-off one probe goes to it; it refuses again (retried on `good`): ejected anew
        time.sleep(COOLDOWN + 0.2)
        send_until(url, body, lambda: len(bad.requests) == 3)
        probed_at = time.monotonic()
        for _ in range(4):
            assert httpx.post(url, json=body, timeout=10).status_code == 200
        assert time.monotonic() - probed_at < 2 * COOLDOWN and len(bad.requests) == 3
        wait_for(lambda: "probes ejected replica bad" in (tmp_path / "proxy.log").read_text(), 5,
                 what="the probe in the log")
        # it recovers: the next probe succeeds and it is back in rotation
        bad.refuse = False
        time.sleep(2 * COOLDOWN + 0.2)  # the cool-off doubled after the failed probe
        send_until(url, body, lambda: len(bad.requests) >= 5)
        assert "back in rotation" in (tmp_path / "proxy.log").read_text()
        metrics = httpx.get("http://127.0.0.1:%d/metrics" % port).text
        assert 'tokenrelay_proxy_replica_ejections_total{deployment="flaky"} 2.0' in metrics
        assert 'tokenrelay_proxy_retries_total{deployment="flaky"}' in metrics
    finally:
        stop_proxy(proc)
        head.stop()
        bad.stop()
        good.stop()
