"""Admission control on a real stack (mock engine): ten times the capacity of two small replicas.

Capacity: 2 replicas x max_ongoing_requests 2 = 4 requests; each proxy worker may queue 2 more per
deployment for 0.5 s. 40 concurrent streams must split into admitted ones that complete in about their
normal time and rejected ones that get 429 + Retry-After quickly, and no replica may hold more than its
limit plus the documented overshoot (docs/api.md, "Admission and overload").
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

LIMIT = 2
WORKERS = 2
SMALL = {"name": "small", "engine": "mock", "model": "mock", "replicas": 2, "max_ongoing_requests": LIMIT,
         "engine_args": {"ttft_ms": 50, "itl_ms": 20, "tokens": 15, "max_running": LIMIT},
         "routing": {"queue_size": 2, "queue_timeout_s": 0.5}}
EMPTY = {"name": "empty", "engine": "mock", "model": "mock", "replicas": 0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = Stack(tmp_path_factory.mktemp("overload"), [SMALL, EMPTY], workers=WORKERS)
    s.start()
    yield s
    s.stop()


async def _one(port: int, out: list[dict[str, Any]]) -> None:
    """One streamed request on its own connection (asyncio: the client must not be the bottleneck)."""
    body = json.dumps({"model": "small", "prompt": "load", "stream": True}).encode()
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    raw = await reader.read(-1)
    elapsed = time.monotonic() - t0
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    out.append({"status": int(lines[0].split()[1]), "elapsed": elapsed, "text": rest.decode(errors="replace"),
                "retry_after": headers.get("retry-after")})


async def _burst(port: int, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    await asyncio.gather(*(_one(port, out) for _ in range(n)))
    return out


def test_ten_times_capacity_admits_some_and_rejects_the_rest_fast(stack: Stack) -> None:
    normal = asyncio.run(_burst(stack.http_port, 1))[0]  # one request alone: its normal latency
    assert normal["status"] == 200

    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:  # the replicas' own view (250 ms status, via agent and head): a lower bound
        while not done.is_set():
            for r in stack.replicas("small"):
                peaks[r["replica_id"]] = max(peaks.get(r["replica_id"], 0), r["running"] + r["waiting"])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = asyncio.run(_burst(stack.http_port, 10 * 2 * LIMIT))
    done.set()
    sampler.join(5)

    ok = [r for r in results if r["status"] == 200]
    rejected = [r for r in results if r["status"] == 429]
    print("\n[overload] normal %.3fs; admitted %s; rejected %s; peaks %s" % (
        normal["elapsed"], sorted(round(r["elapsed"], 3) for r in ok),
        sorted(round(r["elapsed"], 3) for r in rejected), peaks))
    assert len(ok) + len(rejected) == len(results) == 40, [r["status"] for r in results]
    assert len(ok) >= 2 * LIMIT and len(rejected) >= 15
    assert all("data: [DONE]" in r["text"] and '"error"' not in r["text"] for r in ok)
    for r in rejected:
        assert r["retry_after"] and int(r["retry_after"]) >= 1
        assert '"code":"overloaded"' in r["text"] and '"type":"rate_limit_error"' in r["text"]
    fast = [r for r in rejected if r["elapsed"] < 0.1]
    assert len(fast) >= 5  # the queue was full: answered at once
    assert max(r["elapsed"] for r in rejected) < 0.5 + 0.5  # at worst the queue timeout
    # admitted requests waited at most the queue timeout on top of their normal time
    assert max(r["elapsed"] for r in ok) < normal["elapsed"] + 0.5 + 0.5
    # workers - 1 from sharing one report, one more for a report racing a request on the wire (docs/api.md)
    assert peaks and max(peaks.values()) <= LIMIT + WORKERS, peaks
    metrics = httpx.get(stack.base_url + "/metrics").text
    assert 'tokenrelay_proxy_rejected_requests_total{deployment="small",reason="reject_full"}' in metrics


def test_after_the_burst_requests_are_admitted_again(stack: Stack) -> None:
    wait_for(lambda: all(r["running"] == 0 for r in stack.replicas("small")), 5, "the replicas to drain")
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": "small", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_no_healthy_replica_is_503_with_retry_after(stack: Stack) -> None:
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": "empty", "prompt": "x"},
                   headers={"X-Request-ID": "no-replica-1"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "no_healthy_replica" and r.headers["x-request-id"] == "no-replica-1"
