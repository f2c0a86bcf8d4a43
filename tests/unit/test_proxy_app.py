"""Unit tests for proxy.app, proxy.bodies and proxy.streams with a fake Backend (no sockets).

The fake backend hands out RequestStreams pre-filled with scripted replica events and records what the
app closes and aborts, so the HTTP layer is tested through Falcon's WSGI interface alone.
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional

import falcon
import falcon.testing
import gevent
import pytest

from proxy.admission import AdmissionQueue
from proxy.app import create_app
from proxy.config import ProxyConfig
from proxy.gunicorn_hooks import LINGER_ENV
from proxy.router import NONE, ROUTE, Decision
from proxy.streams import Item, RequestStream
from runtime.protocol import Delta, DeploymentRoute, GenerateRequest, ReplicaRoute, RequestError


def ok_script(rid: str) -> list[Item]:
    return [Delta(rid, "Hel", None, 3, 1), Delta(rid, "lo", None, 3, 2), Delta(rid, "!", "stop", 3, 3)]


class FakeBackend:
    """The app's Backend (and the Dispatch's Cluster): one replica "r1" per deployment that has any."""

    started_at = 123

    def __init__(self) -> None:
        self.recorded: list[tuple[str, bool]] = []
        self.streams: list[RequestStream] = []
        self.keys: list[Optional[str]] = []
        self.deps: Optional[dict[str, DeploymentRoute]] = {
            "tiny": DeploymentRoute("tiny", "fake", "m", [ReplicaRoute("r1", "tcp://x:1", 0, 0, 0.0, 8)]),
            "empty": DeploymentRoute("empty", "fake", "m", [])}
        self.script = ok_script
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self.ready = (True, "ok")
        self._n = 0

    def next_request_id(self) -> str:
        self._n += 1
        return "wt-%d" % self._n

    def has_table(self) -> bool:
        return self.deps is not None

    def clock(self) -> float:
        return time.monotonic()  # Dispatch waits on gevent events: its clock must move with them

    def deployment(self, name: str) -> Optional[DeploymentRoute]:
        return None if self.deps is None else self.deps.get(name)

    def deployments(self) -> list[DeploymentRoute]:
        return list(self.deps.values())

    def readiness(self) -> tuple[bool, str]:
        return self.ready

    def choose(self, deployment: str, key: Optional[str], exclude: frozenset[str]) -> Decision:
        self.keys.append(key)
        if not self.deps[deployment].replicas or "r1" in exclude:
            return Decision(NONE)
        return Decision(ROUTE, "r1")

    def queue(self, deployment: str) -> AdmissionQueue:
        return AdmissionQueue(0, 0.0)

    def record(self, replica_id: str, ok: bool) -> None:
        self.recorded.append((replica_id, ok))

    def send(self, replica_id: str, request: GenerateRequest) -> RequestStream:
        self.requests.append(request)
        stream = RequestStream(request.request_id, "r1", on_close=self._on_close)
        self.streams.append(stream)
        for item in self.script(request.request_id):
            stream.push(item)
        return stream

    def _on_close(self, stream: RequestStream) -> None:
        self.closed.append(stream.request_id)
        if not stream.finished:
            self.aborted.append(stream.request_id)


CONFIG = ProxyConfig(head="tcp://127.0.0.1:1", workers=1, first_token_timeout=0.05, idle_timeout=0.05)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(backend: FakeBackend) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(backend, CONFIG))


def chat_body(**fields: Any) -> dict[str, Any]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


def sse_events(text: str) -> list[Any]:
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_openai_error(result: Any, status: int, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    err = result.json["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code
    assert result.headers.get("x-request-id")
    return err


# --------------------------------------------------------------------------- happy paths


def test_chat_stream_sse(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    r = client.simulate_post("/v1/chat/completions",
                             json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {"chatcmpl-wt-1"}
    # everything the replica had sent by the time the client could take it leaves as one chunk
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hello!"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6
    assert backend.closed == ["wt-1"] and backend.aborted == []


def test_completion_stream_without_usage(client: falcon.testing.TestClient) -> None:
    r = client.simulate_post("/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    assert events[0]["object"] == "text_completion" and events[0]["id"] == "cmpl-wt-1"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello!"


def test_chat_non_stream(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    r = client.simulate_post("/v1/chat/completions", json=chat_body(temperature=0.2, stop="x"))
    assert r.status_code == 200
    assert r.json["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert r.json["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert backend.requests[0].params.temperature == 0.2 and backend.requests[0].params.stop == ["x"]
    assert backend.closed == ["wt-1"]


def test_plain_endpoint(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    r = client.simulate_post("/v1/chat/tiny", body=b"tell me", params={"max_tokens": "4"})
    assert r.status_code == 200 and r.text == "Hello!"
    assert r.headers["content-type"].startswith("text/plain")
    assert "content-length" not in r.headers
    assert backend.requests[0].prompt == "tell me" and backend.requests[0].params.max_tokens == 4
    r = client.simulate_post("/v1/chat/tiny", body=b"tell me", query_string="max_token=4")  # a typo
    assert_openai_error(r, 400, param="max_token")
    assert len(backend.requests) == 1


def test_request_id_echoed_or_generated(client: falcon.testing.TestClient) -> None:
    assert client.simulate_get("/health", headers={"X-Request-ID": "abc-1"}).headers["x-request-id"] == "abc-1"
    assert client.simulate_get("/nope").headers["x-request-id"].startswith("wt-")


def test_models_health_ready(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    models = client.simulate_get("/v1/models").json
    assert models["object"] == "list"
    assert models["data"][0] == {"id": "tiny", "object": "model", "created": 123, "owned_by": "tokenrelay"}
    assert client.simulate_get("/health").json == {"status": "ok"}
    assert client.simulate_get("/ready").status_code == 200
    backend.ready = (False, "routing table is stale")
    r = client.simulate_get("/ready")
    assert r.status_code == 503 and r.json["reason"] == "routing table is stale"


def test_a_vllm_deployment_lists_its_engines_own_model_card(client: falcon.testing.TestClient,
                                                            backend: FakeBackend) -> None:
    """What `vllm serve` lists (max_model_len, root, ...) comes from the replica; a card that is not an entry
    for the deployment (a buggy or hostile replica) is not relayed."""
    card = {"id": "tiny", "object": "model", "created": 5, "owned_by": "vllm", "root": "/models/tiny",
            "parent": None, "max_model_len": 512, "permission": [{"object": "model_permission"}]}
    backend.deps["tiny"] = DeploymentRoute("tiny", "vllm", "m", [], model_card=json.dumps(card).encode())
    backend.deps["empty"] = DeploymentRoute("empty", "vllm", "m", [], model_card=b'{"id": "other"}')
    before = int(time.time())
    got = {m["id"]: m for m in client.simulate_get("/v1/models").json["data"]}
    assert got["tiny"]["created"] >= before  # the time of the listing, as vLLM's own
    assert dict(got["tiny"], created=5) == card
    assert got["empty"] == {"id": "empty", "object": "model", "created": 123, "owned_by": "tokenrelay"}


def test_metrics_endpoint(client: falcon.testing.TestClient) -> None:
    client.simulate_post("/v1/chat/completions", json=chat_body())
    r = client.simulate_get("/metrics")
    assert r.status_code == 200 and "tokenrelay_proxy_requests_total" in r.text


# --------------------------------------------------------------------------- errors before headers


def test_bad_json_and_not_object(client: falcon.testing.TestClient) -> None:
    assert_openai_error(client.simulate_post("/v1/chat/completions", body=b"{oops"), 400)
    assert_openai_error(client.simulate_post("/v1/completions", body=b"[]"), 400)


def test_bad_type_names_param(client: falcon.testing.TestClient) -> None:
    err = assert_openai_error(client.simulate_post("/v1/chat/completions", json=chat_body(temperature="hot")),
                              400, param="temperature")
    assert err["type"] == "invalid_request_error"


def test_unknown_model_404(client: falcon.testing.TestClient) -> None:
    assert_openai_error(client.simulate_post("/v1/chat/completions", json=chat_body(model="gpt-9")), 404,
                        param="model", code="model_not_found")
    assert_openai_error(client.simulate_post("/v1/chat/gpt-9", body=b"hi"), 404, param="model",
                        code="model_not_found")


def test_no_replica_503_with_retry_after(client: falcon.testing.TestClient) -> None:
    r = client.simulate_post("/v1/chat/completions", json=chat_body(model="empty"))
    assert_openai_error(r, 503, code="no_healthy_replica")
    assert r.headers["retry-after"] == "1"


def test_before_the_first_table_every_model_is_503_not_404(client: falcon.testing.TestClient,
                                                            backend: FakeBackend) -> None:
    backend.deps = None
    r = client.simulate_post("/v1/chat/completions", json=chat_body(model="anything"))
    assert_openai_error(r, 503, code="no_healthy_replica")
    assert r.headers["retry-after"] == "1"


def test_replica_error_before_first_token_keeps_its_status(client: falcon.testing.TestClient,
                                                           backend: FakeBackend) -> None:
    backend.script = lambda rid: [RequestError(rid, 400, "prompt too long", "invalid_request_error", "messages")]
    r = client.simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    err = assert_openai_error(r, 400, param="messages")
    assert err["message"] == "prompt too long"
    assert backend.aborted == []  # it finished (failed) at the replica: nothing to abort


def test_first_token_timeout_is_504_and_aborts(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    backend.script = lambda rid: []
    r = client.simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    assert_openai_error(r, 504, code="timeout")
    assert backend.aborted == ["wt-1"]


def test_replica_side_abort_is_an_error(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    backend.script = lambda rid: [Delta(rid, "", "abort", 1, 0)]
    assert_openai_error(client.simulate_post("/v1/completions", json={"model": "tiny", "prompt": "x"}), 503)


def test_404_and_405_are_openai_shaped(client: falcon.testing.TestClient) -> None:
    assert_openai_error(client.simulate_get("/v2/whatever"), 404, code="not_found")
    r = client.simulate_get("/v1/chat/completions")
    assert_openai_error(r, 405, code="method_not_allowed")
    assert "POST" in r.headers["allow"]


def test_stored_responses_are_not_found_as_on_vllm_serve(client: falcon.testing.TestClient) -> None:
    """vllm serve (its store off by default) answers an id it does not hold with this 404; tokenrelay
    stores no responses, so both routes always do (and not the generic unknown-path 404)."""
    err = assert_openai_error(client.simulate_get("/v1/responses/resp_abc"), 404, param="response_id")
    assert err["type"] == "invalid_request_error"
    assert err["message"] == "Response with id 'resp_abc' not found."
    err = assert_openai_error(client.simulate_post("/v1/responses/resp_abc/cancel"), 404, param="response_id")
    assert err["message"] == "Response with id 'resp_abc' not found."
    assert_openai_error(client.simulate_delete("/v1/responses/resp_abc"), 405, code="method_not_allowed")


def test_body_too_large(backend: FakeBackend) -> None:
    small = ProxyConfig(head="tcp://127.0.0.1:1", workers=1, max_body_bytes=10)
    client = falcon.testing.TestClient(create_app(backend, small))
    assert_openai_error(client.simulate_post("/v1/chat/completions", json=chat_body()), 413, code="body_too_large")


class StallingInput:
    """A client's body that sends its first bytes, then nothing (wsgi.input)."""

    def __init__(self, first: bytes) -> None:
        self.first = first

    def read(self, size: int = -1) -> bytes:
        if self.first:
            data, self.first = self.first, b""
            return data
        gevent.sleep(30)  # the client stopped sending
        return b""

    readline = read  # what the WSGI validator asks an input stream for

    def readlines(self, hint: int = -1) -> list[bytes]:
        return [self.read()]

    def __iter__(self) -> Any:
        return iter(self.readlines())


@pytest.mark.parametrize("path, content_type", [("/v1/chat/completions", "application/json"),
                                                ("/v1/chat/tiny", "text/plain")])
def test_a_body_that_stalls_is_408_and_the_connection_closes(backend: FakeBackend, path: str,
                                                             content_type: str) -> None:
    """A client that sent its headers and part of its body, then stopped, held its connection forever."""
    app = create_app(backend, ProxyConfig(head="tcp://127.0.0.1:1", workers=1, body_timeout=0.05))
    seen: list[dict] = []

    def server(environ: dict, start_response: Any) -> Any:
        seen.append(environ)
        return app(environ, start_response)

    start = time.monotonic()
    r = falcon.testing.TestClient(server).simulate_post(
        path, headers={"Content-Type": content_type, "Content-Length": "100"},
        extras={"wsgi.input": StallingInput(b'{"model": "ti')})
    assert time.monotonic() - start < 1.0
    err = assert_openai_error(r, 408, code="request_timeout")
    assert err["message"] == "request body stalled: no data for 0.05s"
    assert seen[0].get(LINGER_ENV) is True  # the server hook closes the connection after the answer
    assert backend.requests == []


class BadChunks(StallingInput):
    """A chunked body whose framing gunicorn cannot read (a chunk size of "zz")."""

    def read(self, size: int = -1) -> bytes:
        from gunicorn.http.errors import InvalidChunkSize
        raise InvalidChunkSize(b"zz")

    readline = read


def test_a_malformed_chunked_body_is_400_not_500(backend: FakeBackend, caplog: Any) -> None:
    """gunicorn raises InvalidChunkSize from read(): that was a 500 with a traceback in the log."""
    app = create_app(backend, CONFIG)
    seen: list[dict] = []

    def server(environ: dict, start_response: Any) -> Any:
        seen.append(environ)
        return app(environ, start_response)

    r = falcon.testing.TestClient(server).simulate_post(
        "/v1/chat/completions", headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        extras={"wsgi.input": BadChunks(b"")})
    err = assert_openai_error(r, 400)
    assert err["message"] == "malformed chunked request body: Invalid chunk size: b'zz'"
    assert seen[0].get(LINGER_ENV) is True
    assert "Traceback" not in caplog.text and not any(rec.exc_info for rec in caplog.records)


class ResetMidBody(StallingInput):
    def read(self, size: int = -1) -> bytes:
        raise ConnectionResetError(104, "Connection reset by peer")

    readline = read


def test_a_client_that_resets_mid_body_is_499_not_500(backend: FakeBackend, caplog: Any) -> None:
    """A client gone while its body came in (a reset) was a 500 with an ERROR traceback, each time."""
    r = falcon.testing.TestClient(create_app(backend, CONFIG)).simulate_post(
        "/v1/chat/completions", headers={"Content-Type": "application/json", "Content-Length": "100000"},
        extras={"wsgi.input": ResetMidBody(b"")})
    assert r.status_code == 499  # for the log and metrics: nobody reads it
    assert not any(rec.exc_info or rec.levelname == "ERROR" for rec in caplog.records)
    assert backend.requests == []


def test_a_huge_echoed_value_makes_a_short_log_line(client: falcon.testing.TestClient, caplog: Any) -> None:
    """An unknown model of 1 MB made a 1 MB log line (16 MiB with the largest body)."""
    caplog.set_level("INFO", logger="proxy.app")
    name = "m" * (1 << 20)
    err = assert_openai_error(client.simulate_post("/v1/chat/completions", json=chat_body(model=name)), 404,
                              param="model", code="model_not_found")
    assert name in err["message"]  # the client gets the whole message, as from vllm serve
    lines = [r.getMessage() for r in caplog.records if "-> 404" in r.getMessage()]
    assert len(lines) == 1 and len(lines[0]) < 500 and lines[0].endswith(" chars)")


def test_unexpected_exception_is_500_json(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    def boom(rid: str) -> list[Item]:
        raise RuntimeError("bug")
    backend.script = boom
    assert_openai_error(client.simulate_post("/v1/chat/completions", json=chat_body()), 500)


# --------------------------------------------------------------------------- failures mid-stream


def test_mid_stream_error_becomes_sse_error_event(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    backend.script = lambda rid: [Delta(rid, "Hel", None, 1, 1), RequestError(rid, 500, "engine exploded")]
    r = client.simulate_post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": "engine exploded", "type": "server_error", "param": None,
                                    "code": None}}


def test_mid_stream_silence_times_out_with_error_event(client: falcon.testing.TestClient,
                                                       backend: FakeBackend) -> None:
    backend.script = lambda rid: [Delta(rid, "Hel", None, 1, 1)]
    events = sse_events(client.simulate_post("/v1/chat/completions", json=chat_body(stream=True)).text)
    assert "error" in events[-2] and events[-1] == "[DONE]"
    assert backend.aborted == ["wt-1"]


def test_plain_mid_stream_error_line(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    backend.script = lambda rid: [Delta(rid, "Hel", None, 1, 1), RequestError(rid, 503, "replica r1 died")]
    r = client.simulate_post("/v1/chat/tiny", body=b"x")
    assert r.status_code == 200 and r.text == "Hel\n[error] replica r1 died\n"


def test_client_going_away_aborts(backend: FakeBackend) -> None:
    backend.script = lambda rid: [Delta(rid, "a", None, 1, 1), Delta(rid, "b", None, 1, 2)]
    app = create_app(backend, CONFIG)
    env = falcon.testing.create_environ("/v1/chat/completions", method="POST",
                                        body=json.dumps(chat_body(stream=True)))
    started: list[str] = []
    body = app(env, lambda status, headers, exc_info=None: started.append(status))
    assert started == ["200 OK"]
    first = next(iter(body))
    assert b'"content":"ab"' in first  # both deltas were waiting: one chunk
    body.close()  # what the WSGI server does when a write to the client fails
    assert backend.aborted == ["wt-1"] and backend.closed == ["wt-1"]
    body.close()
    assert backend.closed == ["wt-1"]  # idempotent


# --------------------------------------------------------------------------- RequestStream


def test_request_stream_order_timeout_and_first_terminal_wins() -> None:
    closed: list[str] = []
    s = RequestStream("r", "rep", on_close=lambda st: closed.append(st.request_id))
    assert s.get(0.01) is None
    s.push(Delta("r", "a", None, 1, 1))
    s.push(Delta("r", "b", "stop", 1, 2))
    s.push(RequestError("r", 503, "late"))  # ignored: already finished
    assert s.finished
    assert [s.get(0).text, s.get(0).text] == ["a", "b"]
    assert s.get(0.01) is None
    s.close()
    s.close()
    assert closed == ["r"]


def test_request_stream_fail() -> None:
    s = RequestStream("r", "rep")
    s.fail(503, "lost connection")
    item = s.get(0)
    assert isinstance(item, RequestError) and item.status == 503 and s.finished
