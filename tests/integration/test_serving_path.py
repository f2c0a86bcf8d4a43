"""The whole stack as real processes (`python -m runtime up`) with the mock engine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import ROOT, Stack, wait_for

pytestmark = pytest.mark.integration

MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 2,
        "engine_args": {"ttft_ms": 20, "itl_ms": 10, "tokens": 16}}
EMPTY = {"name": "empty", "engine": "mock", "model": "mock", "replicas": 0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("stack"), [MOCK, EMPTY], workers=2)
    s.start()
    yield s
    s.stop()


def _sse_events(resp: httpx.Response) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_openai_client_streams_and_answers(stack):
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hello there"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == 2
    full = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hello there"}],
                                          max_tokens=5)
    assert full.choices[0].message.content == text
    assert full.choices[0].finish_reason == "length" and full.usage.total_tokens == 7
    comp = client.completions.create(model="mock", prompt="a b c", max_tokens=3)
    assert len(comp.choices[0].text.split()) == 3 and comp.usage.prompt_tokens == 3
    models = client.models.list()
    assert sorted(m.id for m in models.data) == ["empty", "mock"]


def test_sse_wire_format(stack):
    body = {"model": "mock", "prompt": "x y", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", stack.base_url + "/v1/completions", json=body, timeout=10) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"]
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_legacy_plain_text_endpoint_streams_chunks(stack):
    with httpx.stream("POST", stack.base_url + "/v1/chat/mock?max_tokens=6", content="What is ML?",
                      headers={"Content-Type": "text/plain"}, timeout=10) as resp:
        assert resp.status_code == 200
        assert resp.headers.get("transfer-encoding") == "chunked"
        pieces = list(resp.iter_text())
    assert len("".join(pieces).split()) == 6


def test_health_and_ready(stack):
    assert httpx.get(stack.base_url + "/health").json()["status"] == "ok"
    assert httpx.get(stack.base_url + "/ready").status_code == 200


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/chat/completions", {"model": "mock"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "mock", "messages": "hi"}, 400, "messages"),
    ("/v1/completions", {"model": "mock", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", [1, 2], 400, None),
])
def test_bad_requests_get_openai_errors(stack, path, body, status, param):
    r = httpx.post(stack.base_url + path, json=body, headers={"X-Request-ID": "req-123"})
    assert r.status_code == status
    assert r.headers["x-request-id"] == "req-123"
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param


def test_malformed_json_and_no_replica(stack):
    r = httpx.post(stack.base_url + "/v1/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": "empty", "prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["message"]


def _replica_totals(stack) -> tuple[int, int, int]:
    reps = stack.replicas("mock")
    return (sum(r["tokens_generated"] for r in reps), sum(r["requests_aborted"] for r in reps),
            sum(r["running"] for r in reps))


def test_client_disconnect_stops_generation(stack):
    _, aborted_before, _ = _replica_totals(stack)
    body = {"model": "mock", "prompt": "go on", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", stack.base_url + "/v1/completions", json=body, timeout=10) as resp:
        lines = resp.iter_lines()
        for _ in range(5):
            next(lines)
    # the connection is closed: the replica must stop within a second or so, far short of 2000 tokens
    wait_for(lambda: _replica_totals(stack)[1] > aborted_before and _replica_totals(stack)[2] == 0,
             5.0, "the replica to record the abort")
    tokens_after_abort = _replica_totals(stack)[0]
    threading.Event().wait(0.5)
    assert _replica_totals(stack)[0] == tokens_after_abort
    assert _proxy_aborts(stack, "client_gone") >= 1


def _proxy_aborts(stack, reason: str) -> float:
    text = httpx.get(stack.base_url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "tokenrelay_proxy_aborts_total" and s.labels.get("reason") == reason)


def test_concurrent_streams_complete(stack):
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
    results = []

    def one(i):
        out = client.completions.create(model="mock", prompt="n%d" % i, max_tokens=8, stream=True)
        results.append("".join(c.choices[0].text for c in out if c.choices))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 30 and all(len(r.split()) == 8 for r in results)


def test_sigkill_replica_mid_stream(stack):
    """A stream on the killed replica goes on on the other one, with the text of an uninterrupted run;
    new requests are served meanwhile; the replica returns."""
    body = {"model": "mock", "prompt": "long one", "max_tokens": 600, "stream": True}
    whole = httpx.post(stack.base_url + "/v1/completions", json=dict(body, stream=False), timeout=30)
    with httpx.stream("POST", stack.base_url + "/v1/completions", json=body, timeout=10) as resp:
        lines = resp.iter_lines()
        head = [next(lines)]
        def busy():  # exactly our stream running: status lags, so wait until it shows only ours
            reps = stack.replicas("mock")
            return [r for r in reps if r["running"] == 1] if sum(r["running"] for r in reps) == 1 else []
        victim = wait_for(busy, 10.0, "the replica running our stream")[0]
        os.kill(victim["pid"], signal.SIGKILL)
        rest = [line for line in head + list(lines) if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in rest[:-1]]
    assert not any("error" in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole.json()["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("length") == 1
    # meanwhile every new request is served by the other replica
    for _ in range(10):
        r = httpx.post(stack.base_url + "/v1/completions", json={"model": "mock", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
    back = wait_for(lambda: [r for r in stack.replicas("mock")
                             if r["replica_id"] == victim["replica_id"] and r["state"] == "ready"
                             and r["restarts"] >= 1], 10.0, "the killed replica to be READY again")
    assert back[0]["pid"] != victim["pid"]
    assert "[failover]" in stack.log()


def test_each_component_has_help():
    for module in ("head", "agent", "proxy", "model_proc", "runtime"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), (module, out.stderr)


def test_shutdown_stops_every_process_within_10s(tmp_path):
    s = Stack(tmp_path, [dict(MOCK, replicas=2)], workers=2).start()
    tree = s.tree()
    assert len(tree) >= 1 + 3 + 2  # launcher, head, agent, proxy (+ workers), two replicas
    elapsed, leftovers = s.stop()
    assert elapsed < 10.0
    assert leftovers == []
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in tree)
    assert "[shutdown] stack stopped" in s.log()


def test_launcher_restarts_a_crashed_component(tmp_path):
    s = Stack(tmp_path, [dict(MOCK, replicas=1)], workers=1).start()
    try:
        head = [p for p in s.tree() if "head" in " ".join(p.cmdline()[1:4])][0]
        head.kill()
        wait_for(lambda: "[restart] head exited" in s.log(), 10, "the launcher to restart the head")
        wait_for(s.all_ready, 20, "the stack to be ready again")
        r = httpx.post(s.base_url + "/v1/completions", json={"model": "mock", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        s.stop()
