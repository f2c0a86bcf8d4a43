"""Autoscaling on a live mock stack: a step of load scales a deployment up, its end scales it down,
no request fails, and `tokenrelay status` says why."""
from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest

from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

AUTO = {"name": "auto", "engine": "mock", "model": "mock", "replicas": 1, "drain_seconds": 5,
        "engine_args": {"ttft_ms": 20, "itl_ms": 40, "tokens": 40},
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                        "upscale_delay_s": 1, "downscale_delay_s": 3}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("auto"), [AUTO], workers=1)
    s.start()
    yield s
    s.stop()


def test_a_load_step_scales_up_then_down_with_no_failed_request(stack):
    outcomes: Counter = Counter()
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    with http.stream("POST", stack.base_url + "/v1/completions",
                                     json={"model": "auto", "prompt": "u", "stream": True}) as r:
                        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
                        ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                        outcomes["ok" if ok else "failed:%d" % r.status_code] += 1
                except httpx.HTTPError as exc:
                    outcomes["failed:%s" % type(exc).__name__] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    up = wait_for(lambda: (lambda d: d if d["ready_replicas"] == 3 else None)(stack.status()["deployments"]["auto"]),
                  30, "three ready replicas under load")
    assert up["replicas"] == 3
    stop.set()
    for t in threads:
        t.join(30)
    down = wait_for(lambda: (lambda d: d if d["replicas"] == 1 else None)(stack.status()["deployments"]["auto"]),
                    30, "back to one replica once the load is gone")
    assert down["autoscale"]["reason"].startswith("scaled down") or down["autoscale"]["reason"].startswith("steady")
    print("\n[autoscale] outcomes %s, last decision %s" % (dict(outcomes), down["autoscale"]))
    assert set(outcomes) == {"ok"}, outcomes
