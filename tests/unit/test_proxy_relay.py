"""Unit tests for the two OpenAI paths of proxy.app: relayed (a vLLM deployment: the body goes to the
replica untouched, the replica's bytes come back untouched) and mapped (the mock engine: every field it
cannot honour is a 400 naming it). No sockets: tests/unit/test_proxy_app.py's fake backend."""
from __future__ import annotations

import json
from typing import Any

import falcon.testing
import pytest

from proxy.app import create_app
from proxy.openai_request import (
    MockChatRequest, MockCompletionRequest, Routing, prompt_text, routing_fields,
)
from runtime.protocol import Delta, DeploymentRoute, ReplicaRoute, RequestError
from tests.unit.test_proxy_app import CONFIG, FakeBackend, assert_openai_error, chat_body

pytestmark = pytest.mark.unit

CHUNK = 'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
VLLM_ERROR = b'{"error":{"message":"bad role","type":"BadRequestError","param":"messages","code":400}}'


@pytest.fixture
def backend() -> FakeBackend:
    b = FakeBackend()
    assert b.deps is not None
    b.deps["llm"] = DeploymentRoute("llm", "vllm", "m", [ReplicaRoute("r1", "tcp://x:1", 0, 0, 0.0, 8)])
    b.deps["mock"] = DeploymentRoute("mock", "mock", "m", [ReplicaRoute("r1", "tcp://x:1", 0, 0, 0.0, 8)])
    return b


@pytest.fixture
def client(backend: FakeBackend) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(backend, CONFIG))


def test_relayed_body_reaches_the_replica_untouched(client: falcon.testing.TestClient,
                                                    backend: FakeBackend) -> None:
    body = json.dumps({"model": "llm", "messages": [{"role": "user", "content": "hi"}], "tools": [],
                       "tool_choice": "required", "logprobs": True}).encode()
    backend.script = lambda rid: [Delta(rid, "", None, 3, 0), Delta(rid, '{"object":"chat.completion"}', "stop", 3, 1)]
    r = client.simulate_post("/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.text == '{"object":"chat.completion"}'  # the replica's bytes, not re-rendered
    sent = backend.requests[0]
    assert (sent.endpoint, sent.body, sent.messages, sent.prompt) == ("/v1/chat/completions", body, None, None)


def test_the_headers_vllm_reads_go_with_the_body(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    """vLLM's app judges the Content-Type (none or another than JSON: its 400) and takes a data-parallel
    rank, priority, session and trace context from headers; the proxy's key does not go to a replica."""
    backend.script = lambda rid: [Delta(rid, "{}", "stop", 0, 0)]
    client.simulate_post("/v1/completions", body=b'{"model":"llm"}', headers={
        "Content-Type": "text/plain", "X-Data-Parallel-Rank": "3", "X-Session-ID": "s", "Authorization": "Bearer k",
        "X-Other": "x"})
    client.simulate_post("/v1/completions", body=b'{"model":"llm"}')
    client.simulate_post("/v1/completions", body=b'{"model":"llm"}', headers={"X-Request-ID": "mine"})
    client.simulate_post("/v1/completions", body=b'{"model":"llm"}', headers={"X-Request-ID": "\x01"})
    assert [r.headers for r in backend.requests] == [
        {"content-type": "text/plain", "x-data-parallel-rank": "3", "x-session-id": "s"}, {},
        {"x-request-id": "mine"}, {}]  # the client's request id names vLLM's answer, when it is usable


def test_relayed_stream_is_written_through(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    backend.script = lambda rid: [Delta(rid, "", None, 3, 0), Delta(rid, CHUNK, None, 3, 1),
                                  Delta(rid, "data: [DONE]\n\n", None, 3, 1), Delta(rid, "", "stop", 3, 1)]
    r = client.simulate_post("/v1/chat/completions", json={"model": "llm", "messages": [], "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text == CHUNK + "data: [DONE]\n\n"
    assert backend.aborted == []


def test_relayed_error_keeps_the_engines_body(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    backend.script = lambda rid: [RequestError(rid, 400, "bad role", "BadRequestError", "messages", VLLM_ERROR)]
    r = client.simulate_post("/v1/chat/completions", json={"model": "llm", "messages": [{"role": 1}]})
    assert r.status_code == 400 and r.content == VLLM_ERROR


def test_relayed_stream_that_fails_here_ends_with_an_error_event(client: falcon.testing.TestClient,
                                                                 backend: FakeBackend) -> None:
    backend.script = lambda rid: [Delta(rid, CHUNK, None, 3, 1), RequestError(rid, 503, "replica died")]
    r = client.simulate_post("/v1/completions", json={"model": "llm", "prompt": "x", "stream": True})
    assert r.status_code == 200
    first, error, done = r.text.split("\n\n")[:3]
    assert first + "\n\n" == CHUNK and json.loads(error[len("data: "):])["error"]["message"] == "replica died"
    assert done == "data: [DONE]"


@pytest.mark.parametrize("path", ["/v1/responses", "/tokenize", "/detokenize"])
def test_new_routes_are_relayed(client: falcon.testing.TestClient, backend: FakeBackend, path: str) -> None:
    backend.script = lambda rid: [Delta(rid, '{"ok":1}', "stop", 0, 0)]
    r = client.simulate_post(path, json={"model": "llm", "prompt": "x"})
    assert r.status_code == 200 and r.json == {"ok": 1} and backend.requests[0].endpoint == path


def test_tokenize_never_streams(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    backend.script = lambda rid: [Delta(rid, '{"count":1}', "stop", 0, 0)]
    r = client.simulate_post("/tokenize", json={"model": "llm", "prompt": "x", "stream": True})
    assert r.headers["content-type"] == "application/json" and r.json == {"count": 1}


def test_model_may_be_left_out_when_one_vllm_deployment_serves(backend: FakeBackend) -> None:
    assert backend.deps is not None
    backend.deps = {"llm": backend.deps["llm"]}
    backend.script = lambda rid: [Delta(rid, "{}", "stop", 0, 0)]
    c = falcon.testing.TestClient(create_app(backend, CONFIG))
    assert c.simulate_post("/v1/chat/completions", json={"messages": []}).status_code == 200


def test_model_is_required_otherwise(client: falcon.testing.TestClient) -> None:
    assert_openai_error(client.simulate_post("/v1/chat/completions", json={"messages": []}), 400, "model")


@pytest.mark.parametrize("field,value", [("tools", []), ("tool_choice", "required"), ("logprobs", True),
                                         ("response_format", {"type": "json_object"}), ("min_tokens", 2)])
def test_mock_refuses_what_it_cannot_honour(client: falcon.testing.TestClient, backend: FakeBackend,
                                            field: str, value: Any) -> None:
    r = client.simulate_post("/v1/chat/completions", json=chat_body(model="mock", **{field: value}))
    err = assert_openai_error(r, 400, field)
    assert "mock" in err["message"] and backend.requests == []


def test_mock_accepts_its_documented_fields(client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    body = chat_body(model="mock", stream=False, stream_options=None, max_tokens=3, max_completion_tokens=3, n=1,
                     temperature=0.5, top_p=0.9, top_k=4, stop=["x"], seed=1, presence_penalty=0.1,
                     frequency_penalty=0.1, user="u", logprobs=None)  # null means absent
    assert set(body) - {"logprobs"} <= set(MockChatRequest.__struct_fields__)
    assert client.simulate_post("/v1/chat/completions", json=body).status_code == 200
    completion = {"model": "mock", "prompt": "p", "max_tokens": 2, "stop": "x"}
    assert set(completion) <= set(MockCompletionRequest.__struct_fields__)
    assert client.simulate_post("/v1/completions", json=completion).status_code == 200


@pytest.mark.parametrize("path", ["/v1/responses", "/tokenize", "/detokenize"])
def test_mock_refuses_routes_it_does_not_serve(client: falcon.testing.TestClient, path: str) -> None:
    err = assert_openai_error(client.simulate_post(path, json={"model": "mock", "input": "x"}), 400)
    assert path in err["message"]


def test_routing_fields_read_as_vllm_serve_reads_them() -> None:
    """`stream` is pydantic's lax bool there ("true", 1, "no" are booleans: vllm serve streams or not), ""
    is no model, and JSON is what Python's json takes (a BOM, NaN): they were 400s here."""
    assert routing_fields(b'{"model":"a","stream":true,"x":[1]}') == Routing("a", True)
    for stream, streams in ((b'"true"', True), (b'"YES"', True), (b"1", True), (b"1.0", True), (b'"off"', False),
                            (b"0", False), (b"null", False)):
        assert routing_fields(b'{"model":"a","stream":%s}' % stream) == Routing("a", streams), stream
    assert routing_fields(b'\xef\xbb\xbf{"model":"a","stream":true}') == Routing("a", True)
    assert routing_fields(b'{"model":"a","stream":true,"top_p":NaN}') == Routing("a", True)
    assert routing_fields(b'{"model":"","prompt":"x"}').model is None


def test_routing_fields_say_what_the_proxy_would_refuse() -> None:
    """What the proxy answers itself when no vLLM deployment takes the body: a 400 naming the field."""
    deep = b"[" * 5000 + b"]" * 5000
    for body, param in ((b'{"model":3}', "model"), (b'{"model":""}', "model"),
                        (b'{"model":"a","stream":"maybe"}', "stream"), (b'{"model":"a","stream":2}', "stream"),
                        (b"", None), (b"[1]", None), (b"{nope", None), (deep, None),
                        (b'{"model":"a","x":%s}' % deep, None)):
        problem = routing_fields(body).problem
        assert problem is not None and problem.param == param, body[:30]


@pytest.mark.parametrize("body", [b'{"model":"nope","messages":[]}', b'{"model":5,"messages":[]}',
                                  b'{"model":"","messages":[]}', b"", b"[]", b"{", b'{"messages":[],"stream":2}'])
def test_the_only_vllm_deployment_answers_what_the_proxy_cannot_route(backend: FakeBackend, body: bytes) -> None:
    """As `vllm serve` (one model) answers them: an unknown, empty or ill-typed model, a body that is not a
    JSON object, an unreadable `stream` go to its app (its 404 or 400, with its type and param)."""
    assert backend.deps is not None
    backend.deps = {"llm": backend.deps["llm"]}
    backend.script = lambda rid: [RequestError(rid, 400, "bad", "Bad Request", "body", VLLM_ERROR)]
    c = falcon.testing.TestClient(create_app(backend, CONFIG))
    r = c.simulate_post("/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.content == VLLM_ERROR
    assert backend.requests[0].body == body and backend.requests[0].endpoint == "/v1/chat/completions"


@pytest.mark.parametrize("body,status,param", [(b'{"model":"nope","messages":[]}', 404, "model"),
                                               (b'{"model":5,"messages":[]}', 400, "model"),
                                               (b'{"model":"llm","stream":"maybe"}', 200, None),
                                               (b"[]", 400, None), (b"", 400, None)])
def test_with_several_deployments_the_proxy_answers_itself(client: falcon.testing.TestClient, backend: FakeBackend,
                                                            body: bytes, status: int, param: str) -> None:
    """It cannot tell which deployment was meant; a named vLLM one still judges its own body."""
    backend.script = lambda rid: [Delta(rid, "{}", "stop", 0, 0)]
    r = client.simulate_post("/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    if status == 200:
        assert r.status_code == 200 and backend.requests[0].body == body
    else:
        assert r.status_code == status and r.json["error"]["param"] == param, r.text
        assert backend.requests == []


def test_prompt_text_for_prefix_routing() -> None:
    assert prompt_text(b'{"messages":[{"role":"user","content":"hi"}]}', 100) == "user: hi\n"
    assert prompt_text(b'{"prompt":"abc"}', 100) == "abc"
    assert prompt_text(b'{"input":"abc"}', 100) == "abc"
    assert prompt_text(b'{"prompt":[1,2]}', 100) == "[1,2]"
    assert prompt_text(b"not json", 100) == ""
    two = b'{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello there"}]}'
    assert prompt_text(two, 100) == "system: be brief\nuser: hello there\n"
    assert prompt_text(two, 20) == "system: be brief\nuse"  # the first `limit` characters, exactly
    assert prompt_text(b'{"prompt":"abcdef"}', 3) == "abc"


def test_prompt_text_of_images_is_their_url_start_not_a_rendering_of_the_image() -> None:
    image = "data:image/png;base64," + "A" * 5_000_000
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": image}}]}]})
    text = prompt_text(body.encode(), 64)
    assert text == ("user: what is this?" + image)[:64]
    other = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,B"}}]}]})
    assert prompt_text(other.encode(), 64) != text  # a different image is a different prefix


def test_a_relayed_whole_answer_may_take_longer_than_the_first_token_timeout(
        client: falcon.testing.TestClient, backend: FakeBackend) -> None:
    """vLLM hands a non-streamed request's output over only at the end: no first-token or idle timeout
    (CONFIG: 0.05 s) may cut it off, only the total one."""
    import gevent

    def late(rid: str) -> list[Any]:
        stream = backend.streams[-1]
        gevent.spawn_later(0.2, stream.push, Delta(rid, '{"late":true}', "stop", 1, 1))
        return []

    backend.script = late
    r = client.simulate_post("/v1/completions", json={"model": "llm", "prompt": "x"})
    assert r.status_code == 200 and r.json == {"late": True}
