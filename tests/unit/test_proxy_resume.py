"""Mid-stream resume through the Falcon app with a fake two-replica backend (no sockets): a replica lost
after some tokens is replaced by another that continues from the token ids already sent, and the client
sees one uninterrupted response (streaming and not), or the old error where a resume is not possible."""
from __future__ import annotations

import json
from typing import Any, Optional

import falcon.testing
import gevent
import msgspec

from proxy.app import create_app
from proxy.config import ProxyConfig
from proxy.router import NONE, ROUTE, Decision
from proxy.streams import RequestStream
from runtime.protocol import (
    SHUTTING_DOWN, Delta, DeploymentRoute, GenerateRequest, ReplicaRoute, RoutingSettings,
)
from tests.unit.test_proxy_app import FakeBackend, chat_body

WORDS = ["w%d " % i for i in range(20)]


class TwoReplicas(FakeBackend):
    """Replicas r1 and r2; each generates WORDS[k] as token id k for k < 6, continuing after any resume
    ids. `lose_after[rid]` tokens in, the replica is lost (`how`: "lost" connection or "drain" error)."""

    def __init__(self, resume: bool = True, ids: bool = True) -> None:
        super().__init__()
        route = [ReplicaRoute("r1", "tcp://x:1", 0, 0, 0.0, 8), ReplicaRoute("r2", "tcp://x:2", 0, 0, 0.0, 8)]
        self.deps = {"tiny": DeploymentRoute("tiny", "fake", "m", route, RoutingSettings(resume=resume))}
        self.lose_after: dict[str, int] = {"r1": 2}
        self.how = "lost"
        self.ids = ids
        self.sent_to: list[str] = []
        self.down: set[str] = set()  # lost replicas: the router skips them (ReplicaView.down)

    def choose(self, deployment: str, key: Optional[str], exclude: frozenset[str]) -> Decision:
        for rid in ("r1", "r2"):
            if rid not in exclude and rid not in self.down:
                return Decision(ROUTE, rid)
        return Decision(NONE)

    def send(self, replica_id: str, request: GenerateRequest) -> RequestStream:
        self.requests.append(request)
        self.sent_to.append(replica_id)
        stream = RequestStream(request.request_id, replica_id, on_close=self._on_close)
        self.streams.append(stream)
        gevent.spawn(self._generate, stream, request, self.lose_after.get(replica_id))
        return stream

    def _generate(self, stream: RequestStream, request: GenerateRequest, lose_after: Optional[int]) -> None:
        k = len(request.resume.token_ids) if request.resume else 0
        made = 0
        while True:
            gevent.sleep(0.001)
            if lose_after is not None and made == lose_after:
                if self.how == "lost":
                    self.down.add(stream.replica_id)
                    stream.fail(503, "lost connection to replica %s" % stream.replica_id, lost=True)
                else:
                    stream.fail(503, "replica shut down before the request finished", SHUTTING_DOWN)
                return
            finish = "length" if k == 5 else None
            ids = [k] if self.ids else []
            delta = Delta(stream.request_id, WORDS[k], finish, 4, k + 1, ids)
            stream.token_ids.extend(delta.token_ids)  # as proxy/replicas.py's reader does
            stream.completion_tokens = delta.completion_tokens
            stream.push(delta)
            k += 1
            made += 1
            if finish:
                return


def client_for(backend: FakeBackend, **config: Any) -> falcon.testing.TestClient:
    cfg = dict(head="tcp://127.0.0.1:1", workers=1, first_token_timeout=1.0, idle_timeout=1.0,
               keepalive_interval=0.05, retry_window=0.6)
    return falcon.testing.TestClient(create_app(backend, ProxyConfig(**dict(cfg, **config))))


def sse(text: str) -> tuple[str, list[dict], list[str]]:
    """(content, data chunks, raw blocks) of an SSE body."""
    blocks = text.split("\n\n")[:-1]
    data = [json.loads(b[6:]) for b in blocks if b.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in data if c.get("choices"))
    return content, data, blocks


def test_a_stream_whose_replica_is_lost_goes_on_elsewhere_without_a_seam() -> None:
    backend = TwoReplicas()
    body = chat_body(stream=True, stream_options={"include_usage": True})
    r = client_for(backend).simulate_post("/v1/chat/completions", json=body)
    content, data, blocks = sse(r.text)
    assert r.status_code == 200 and blocks[-1] == "data: [DONE]"
    assert not any("error" in c for c in data)
    assert content == "".join(WORDS[:6])  # nothing repeated, nothing missing
    assert [c["choices"][0]["finish_reason"] for c in data if c.get("choices")].count("length") == 1
    assert data[-1]["usage"]["completion_tokens"] == 6  # each token counted once
    assert backend.sent_to == ["r1", "r2"]
    assert backend.requests[1].resume is not None and backend.requests[1].resume.token_ids == [0, 1]
    assert ("r1", False) in backend.recorded  # the lost replica counts against its breaker


def test_a_non_streaming_request_is_resumed_too() -> None:
    backend = TwoReplicas()
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(max_tokens=6))
    assert r.status_code == 200, r.text
    assert r.json["choices"][0]["message"]["content"] == "".join(WORDS[:6])
    assert r.json["usage"]["completion_tokens"] == 6


def test_a_replica_shutting_down_mid_stream_is_resumed_and_not_held_against_it() -> None:
    backend = TwoReplicas()
    backend.how = "drain"
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    assert sse(r.text)[0] == "".join(WORDS[:6])
    assert ("r1", False) not in backend.recorded


def test_resumes_are_bounded_then_the_stream_fails_as_before() -> None:
    backend = TwoReplicas()
    backend.lose_after = {"r1": 2, "r2": 1}
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    content, data, blocks = sse(r.text)
    assert content == "".join(WORDS[:3])  # r1 gave 2 tokens, r2 one more, then nobody was left
    assert "error" in data[-1] and blocks[-1] == "data: [DONE]"
    assert backend.sent_to == ["r1", "r2"]


def test_no_resume_when_the_deployment_switches_it_off() -> None:
    backend = TwoReplicas(resume=False)
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    content, data, _ = sse(r.text)
    assert content == "".join(WORDS[:2]) and "lost connection" in data[-1]["error"]["message"]
    assert backend.sent_to == ["r1"]


def test_no_resume_without_token_ids_as_the_text_would_repeat() -> None:
    backend = TwoReplicas(ids=False)
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    content, data, _ = sse(r.text)
    assert content == "".join(WORDS[:2]) and "error" in data[-1]
    assert backend.sent_to == ["r1"]


def test_with_every_replica_lost_a_resume_waits_for_one_to_come_back() -> None:
    backend = TwoReplicas()
    backend.lose_after = {"r1": 2}
    backend.down.add("r2")  # r2 is restarting
    gevent.spawn_later(0.3, backend.down.discard, "r2")
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    assert sse(r.text)[0] == "".join(WORDS[:6])
    assert backend.sent_to == ["r1", "r2"]


# --------------------------------------------------------------------------- relayed (vLLM) requests

WHOLE = '{"object":"chat.completion","choices":[{"message":{"content":"all of it"}}]}'
ROLE = 'data: {"id":"chatcmpl-x","created":1234,"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
EVENT = 'data: {"id":"chatcmpl-x","created":1234,"choices":[{"index":0,"delta":{"content":"w%d"}}]}\n\n'


class RelayedReplicas(TwoReplicas):
    """A vLLM deployment on r1 and r2: r1 is lost `lost_at` seconds in (past the retry window), r2 answers
    with the whole JSON body, or, streamed, continues after the ids it was given. `ids`: r1 reports the
    token id behind each event (as a replica does for a resumable stream)."""

    def __init__(self, lost_at: float = 0.8, ids: bool = True) -> None:
        super().__init__(ids=ids)
        self.deps["tiny"] = msgspec.structs.replace(self.deps["tiny"], engine="vllm")
        self.lost_at = lost_at

    def _push(self, stream: RequestStream, text: str, finish: Optional[str], done: int, ids: list[int]) -> None:
        delta = Delta(stream.request_id, text, finish, 4, done, ids if self.ids else [])
        stream.token_ids.extend(delta.token_ids)  # as proxy/replicas.py's reader does
        stream.completion_tokens = delta.completion_tokens
        stream.push(delta)

    def _generate(self, stream: RequestStream, request: GenerateRequest, lose_after: Optional[int]) -> None:
        streaming = json.loads(request.body).get("stream", False)
        if lose_after is not None:  # r1: the role event and `lose_after` tokens (if streamed), then lost
            if streaming:
                self._push(stream, ROLE, None, 0, [])
                for k in range(lose_after):
                    self._push(stream, EVENT % k, None, k + 1, [k])
            gevent.sleep(self.lost_at)
            self.down.add(stream.replica_id)
            stream.fail(503, "lost connection to replica %s" % stream.replica_id, lost=True)
            return
        gevent.sleep(0.01)
        if not streaming:
            self._push(stream, WHOLE, "stop", 6, [])
            return
        start = len(request.resume.token_ids) if request.resume else 0
        if not start:
            self._push(stream, ROLE, None, 0, [])
        for k in range(start, 4):
            self._push(stream, EVENT % k, None, k + 1, [k])
        self._push(stream, "data: [DONE]\n\n", "stop", 4, [])


def test_a_relayed_non_streaming_request_whose_replica_is_lost_starts_over_elsewhere() -> None:
    """Nothing of a relayed non-streamed answer reached the client: the same body goes to another replica,
    even after the retry window (0.6 s here) that bounds retries of refused sends."""
    backend = RelayedReplicas(lost_at=0.8)
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(model="tiny", max_tokens=6))
    assert r.status_code == 200, r.text
    assert r.text == WHOLE
    assert backend.sent_to == ["r1", "r2"]
    assert backend.requests[1].body == backend.requests[0].body and backend.requests[1].resume is None
    assert ("r1", False) in backend.recorded


def test_a_relayed_non_streaming_request_is_not_restarted_when_the_deployment_says_no() -> None:
    backend = RelayedReplicas(lost_at=0.8)
    backend.deps["tiny"] = msgspec.structs.replace(backend.deps["tiny"], routing=RoutingSettings(resume=False))
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(model="tiny"))
    assert r.status_code == 503 and "lost connection" in r.json["error"]["message"]
    assert backend.sent_to == ["r1"]


def test_a_relayed_stream_resumes_after_the_ids_with_the_clients_created() -> None:
    backend = RelayedReplicas(lost_at=0.05)
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(model="tiny", stream=True))
    assert r.status_code == 200
    assert r.text == ROLE + "".join(EVENT % k for k in range(4)) + "data: [DONE]\n\n"  # one seamless stream
    assert backend.sent_to == ["r1", "r2"]
    resume = backend.requests[1].resume
    assert resume is not None and (resume.token_ids, resume.created) == ([0, 1], 1234)
    assert backend.requests[1].body == backend.requests[0].body


def test_a_relayed_stream_without_token_ids_is_not_resumed() -> None:
    """A replica reports no ids for a stream it cannot resume (tools, n > 1, stop strings, ...): the stream
    ends with an error event as before."""
    backend = RelayedReplicas(lost_at=0.05, ids=False)
    r = client_for(backend).simulate_post("/v1/chat/completions", json=chat_body(model="tiny", stream=True))
    assert r.status_code == 200
    assert r.text.startswith(ROLE + EVENT % 0 + EVENT % 1) and "lost connection" in r.text
    assert r.text.endswith("data: [DONE]\n\n")
    assert backend.sent_to == ["r1"]
