"""Unit tests of streaming limits through the Falcon app with a fake backend (no sockets): early
headers with SSE keep-alives, first-token / idle / total timeouts (per deployment too), bounded
buffering and coalescing for slow readers."""
from __future__ import annotations

import json
from typing import Any

import falcon.testing
import gevent
import pytest

from proxy.app import create_app
from proxy.config import ProxyConfig
from proxy.streams import ITEM_COST, RequestStream
from runtime.protocol import Delta, DeploymentRoute, ReplicaRoute, TimeoutSettings
from tests.unit.test_proxy_app import FakeBackend, assert_openai_error, chat_body

FAST = dict(head="tcp://127.0.0.1:1", workers=1, first_token_timeout=1.0, idle_timeout=1.0,
            keepalive_interval=0.05)


def client_for(backend: FakeBackend, **config: Any) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(backend, ProxyConfig(**dict(FAST, **config))))


def blocks(text: str) -> list[str]:
    assert text.endswith("\n\n")
    return text.split("\n\n")[:-1]


def push_later(backend: FakeBackend, delay: float, *items: Delta) -> None:
    def go() -> None:
        for item in items:
            backend.streams[-1].push(item)
    gevent.spawn_later(delay, go)


# --------------------------------------------------------------------------- keep-alives


def test_slow_first_token_sends_headers_early_then_keepalives_then_tokens() -> None:
    backend = FakeBackend()
    backend.script = lambda rid: []
    push_later(backend, 0.5, Delta("wt-1", "late", None, 1, 1), Delta("wt-1", "!", "stop", 1, 2))
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    parts = blocks(r.text)
    alive = [p for p in parts if p == ": keep-alive"]
    assert len(alive) >= 2 and parts[0] == ": keep-alive"
    data = [json.loads(p[6:]) for p in parts if p.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in data) == "late!"
    assert parts[-1] == "data: [DONE]" and backend.aborted == []


def test_fast_first_token_needs_no_keepalive() -> None:
    backend = FakeBackend()
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    assert ": keep-alive" not in r.text and r.text.endswith("data: [DONE]\n\n")


def test_first_token_timeout_after_early_headers_is_an_sse_error_and_aborts() -> None:
    backend = FakeBackend()
    backend.script = lambda rid: []
    r = client_for(backend, first_token_timeout=0.2).simulate_post(
        "/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200
    parts = blocks(r.text)
    assert parts[0] == ": keep-alive" and parts[-1] == "data: [DONE]"
    err = json.loads(parts[-2][6:])["error"]
    assert err["code"] == "timeout" and "first token" in err["message"]
    assert backend.aborted == ["wt-1"]


def test_non_streaming_requests_never_send_early_headers() -> None:
    backend = FakeBackend()
    backend.script = lambda rid: []
    push_later(backend, 0.2, Delta("wt-1", "ok", "stop", 1, 1))
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200 and r.json["choices"][0]["message"]["content"] == "ok"


# --------------------------------------------------------------------------- timeouts


def test_total_timeout_ends_a_stream_that_keeps_going() -> None:
    backend = FakeBackend()
    backend.script = lambda rid: [Delta(rid, "a", None, 1, 1)]

    def trickle() -> None:
        for i in range(50):
            gevent.sleep(0.02)
            backend.streams[-1].push(Delta("wt-1", "b", None, 1, 2 + i))
    gevent.spawn(trickle)
    r = client_for(backend, total_timeout=0.3).simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    parts = blocks(r.text)
    err = json.loads(parts[-2][6:])["error"]
    assert err["code"] == "timeout" and "in all" in err["message"]
    assert backend.aborted == ["wt-1"]


def test_deployment_timeouts_override_the_proxy_defaults() -> None:
    backend = FakeBackend()
    backend.script = lambda rid: []
    backend.deps["tiny"] = DeploymentRoute("tiny", "fake", "m", [ReplicaRoute("r1", "tcp://x:1", 0, 0, 0.0, 8)],
                                           timeouts=TimeoutSettings(first_token_s=0.1))
    client = client_for(backend, first_token_timeout=30.0, keepalive_interval=5.0)
    r = client.simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    assert_openai_error(r, 504, code="timeout")  # 0.1 s, before the keep-alive point: a real status
    backend.script = lambda rid: [Delta(rid, "a", None, 1, 1)]
    backend.deps["tiny"] = DeploymentRoute("tiny", "fake", "m", [ReplicaRoute("r1", "tcp://x:1", 0, 0, 0.0, 8)],
                                           timeouts=TimeoutSettings(idle_s=0.1))
    r = client.simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    err = json.loads(blocks(r.text)[-2][6:])["error"]
    assert err["code"] == "timeout" and "no token" in err["message"]


# --------------------------------------------------------------------------- slow readers


def test_stream_buffer_is_bounded() -> None:
    s = RequestStream("r", "rep", max_pending=10 + 2 * ITEM_COST)
    assert s.push(Delta("r", "x" * 6, None, 1, 1))
    assert s.push(Delta("r", "x" * 4, None, 1, 2)) and s.pending == 10 + 2 * ITEM_COST
    assert not s.push(Delta("r", "y", None, 1, 3))  # refused: the connection cuts the request off
    s.fail(408, "too slow", drop_pending=True)
    assert s.finished and s.pending == 0
    item = s.get(0)
    assert item.status == 408  # what was pending is dropped; the client learns why at once


def test_a_single_big_delta_is_accepted_into_an_empty_buffer() -> None:
    s = RequestStream("r", "rep", max_pending=4)
    assert s.push(Delta("r", "x" * 100, None, 1, 1))


def test_many_small_deltas_count_their_overhead_not_just_their_text() -> None:
    s = RequestStream("r", "rep", max_pending=100 * (6 + ITEM_COST))
    pushed = 0
    while s.push(Delta("r", "word. ", None, 1, pushed + 1)):
        pushed += 1
    assert pushed == 100  # not 100 * (6 + ITEM_COST) / 6 objects for a bound of that many characters


def test_drain_coalesces_up_to_the_bound_and_stops_at_a_terminal_item() -> None:
    s = RequestStream("r", "rep")
    for i in range(5):
        s.push(Delta("r", "abc", None, 1, i + 1))
    s.push(Delta("r", "", "stop", 1, 6))
    first = s.drain(7)
    assert [d.text for d in first] == ["abc", "abc"] and s.pending == 3 * (3 + ITEM_COST) + ITEM_COST
    rest = s.drain(100)
    assert [d.finish_reason for d in rest] == [None, None, None, "stop"] and s.pending == 0
    assert s.drain(100) == []


@pytest.mark.parametrize("max_chunk, writes", [(1 << 16, 1), (3, 3)])
def test_a_lagging_client_gets_fewer_larger_chunks(max_chunk: int, writes: int) -> None:
    backend = FakeBackend()
    backend.script = lambda rid: [Delta(rid, "abc", None, 1, i + 1) for i in range(5)] + [
        Delta(rid, "", "stop", 1, 6)]
    app = create_app(backend, ProxyConfig(**dict(FAST, max_chunk_chars=max_chunk)))
    env = falcon.testing.create_environ("/v1/completions", method="POST",
                                        body=json.dumps({"model": "tiny", "prompt": "x", "stream": True}))
    body = app(env, lambda status, headers, exc_info=None: None)
    out = list(body)
    body.close()
    assert len(out) == writes  # the replica's deltas were all waiting: as few writes as the bound allows
    text = "".join(json.loads(p[6:])["choices"][0]["text"] for chunk in out
                   for p in blocks(chunk.decode()) if p.startswith("data: {"))
    assert text == "abc" * 5
