"""Unit tests of the proxy's HTTP edge with a fake backend (no sockets): API keys, per-key rate
limits, content types, the OpenAPI document, and the routing key handed to the router."""
from __future__ import annotations

from typing import Any

import falcon.testing
import pytest

from proxy.access import ApiKeys
from proxy.app import create_app
from proxy.config import ProxyConfig
from proxy.openapi import SPEC
from runtime.protocol import DeploymentRoute, ReplicaRoute, RoutingSettings
from tests.unit.test_proxy_app import FakeBackend, assert_openai_error, chat_body

BASE = dict(head="tcp://127.0.0.1:1", workers=1, first_token_timeout=1.0, idle_timeout=1.0)
KEY = {"Authorization": "Bearer sk-good"}


def client_for(backend: FakeBackend, keys: str = "", **config: Any) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(backend, ProxyConfig(**dict(BASE, **config)),
                                                ApiKeys.parse(keys, None)))


# --------------------------------------------------------------------------- API keys


def test_without_keys_everything_is_open() -> None:
    c = client_for(FakeBackend())
    assert c.simulate_post("/v1/chat/completions", json=chat_body()).status_code == 200


@pytest.mark.parametrize("headers, message", [
    ({}, "didn't provide an API key"),
    ({"Authorization": "Bearer sk-bad"}, "Incorrect API key"),
    ({"Authorization": "sk-good"}, "Incorrect API key"),
])
def test_v1_needs_a_valid_bearer_key(headers: dict[str, str], message: str) -> None:
    backend = FakeBackend()
    c = client_for(backend, "sk-good")
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/nothing"),
                         ("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", "/v1/chat/tiny"),
                         ("GET", "/nothing")):
        r = c.simulate_request(method, path, json=chat_body(), headers=dict(headers, **{"X-Request-ID": "cid"}))
        err = assert_openai_error(r, 401, code="invalid_api_key")
        assert message in err["message"] and r.headers["www-authenticate"] == "Bearer"
        assert r.headers["x-request-id"] == "cid"
    assert backend.requests == []  # nothing reached a replica


def test_a_valid_key_passes_and_health_stays_open_unless_protected() -> None:
    c = client_for(FakeBackend(), "sk-good")
    assert c.simulate_post("/v1/chat/completions", json=chat_body(), headers=KEY).status_code == 200
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert c.simulate_get(path).status_code == 200, path
    guarded = client_for(FakeBackend(), "sk-good", protect_health=True)
    for path in ("/health", "/ready", "/metrics"):
        assert_openai_error(guarded.simulate_get(path), 401, code="invalid_api_key")
        assert guarded.simulate_get(path, headers=KEY).status_code == 200
    assert guarded.simulate_get("/openapi.json").status_code == 200


def test_rate_limit_per_key_is_429_with_retry_after() -> None:
    c = client_for(FakeBackend(), "sk-good\nsk-vip 1000", rate_limit=2)
    for _ in range(2):
        assert c.simulate_get("/v1/models", headers=KEY).status_code == 200
    r = c.simulate_get("/v1/models", headers=KEY)
    err = assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    vip = {"Authorization": "Bearer sk-vip"}  # its own limit in the keys file
    assert all(c.simulate_get("/v1/models", headers=vip).status_code == 200 for _ in range(10))


def test_health_probes_with_a_key_never_use_its_rate_limit() -> None:
    """`tokenrelay up` with TOKENRELAY_API_KEYS, --protect-health and a rate limit: the launcher's
    readiness probes (and a load balancer's) spent the first key's budget, so the user's first request
    with that key got 429, and so did the probes."""
    c = client_for(FakeBackend(), "sk-good", rate_limit=2, protect_health=True)
    for _ in range(10):
        for path in ("/health", "/ready"):
            assert c.simulate_get(path, headers=KEY).status_code == 200, path
    for _ in range(2):
        assert c.simulate_get("/v1/models", headers=KEY).status_code == 200
    assert_openai_error(c.simulate_get("/v1/models", headers=KEY), 429, code="rate_limit_exceeded")
    # /metrics merges every worker's files (not cheap): a key holder's scrapes count like any request
    assert_openai_error(c.simulate_get("/metrics", headers=KEY), 429, code="rate_limit_exceeded")
    assert_openai_error(c.simulate_get("/ready"), 401, code="invalid_api_key")  # still needs the key


# --------------------------------------------------------------------------- content types


@pytest.mark.parametrize("content_type, status", [
    ("application/json", 200), ("application/json; charset=utf-8", 200), ("APPLICATION/JSON", 200),
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415),
])
def test_json_endpoints_check_the_content_type(content_type: str, status: int) -> None:
    c = client_for(FakeBackend())
    r = c.simulate_post("/v1/completions", body=b'{"model": "tiny", "prompt": "x"}',
                        headers={"Content-Type": content_type})
    if status == 415:
        assert_openai_error(r, 415, code="unsupported_media_type")
    else:
        assert r.status_code == 200, r.text


def test_plain_endpoint_takes_text_only() -> None:
    c = client_for(FakeBackend())
    assert c.simulate_post("/v1/chat/tiny", body=b"hi", headers={"Content-Type": "text/plain"}).status_code == 200
    assert_openai_error(c.simulate_post("/v1/chat/tiny", body=b"hi", headers={"Content-Type": "application/json"}),
                        415, code="unsupported_media_type")


# --------------------------------------------------------------------------- OpenAPI


def test_openapi_document_is_served_and_names_every_route() -> None:
    r = client_for(FakeBackend()).simulate_get("/openapi.json")
    assert r.status_code == 200 and r.json == SPEC
    assert r.json["openapi"].startswith("3.1")
    relayed = ("/v1/responses", "/tokenize", "/detokenize")
    assert set(r.json["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/chat/{deployment}",
                                    "/v1/models", "/health", "/ready", "/metrics", "/openapi.json", *relayed,
                                    "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel"}
    for path in ("/v1/chat/completions", "/v1/completions", *relayed):
        assert set(r.json["paths"][path]["post"]["responses"]) >= {"200", "400", "401", "404", "413", "415",
                                                                  "429", "503", "504"}


# --------------------------------------------------------------------------- routing keys


def _with_routing(backend: FakeBackend, routing: RoutingSettings) -> None:
    backend.deps["tiny"] = DeploymentRoute("tiny", "fake", "m", [ReplicaRoute("r1", "tcp://x:1", 0, 0, 0.0, 8)],
                                           routing=routing)


def test_session_header_and_prompt_prefix_become_the_routing_key() -> None:
    backend = FakeBackend()
    c = client_for(backend)
    c.simulate_post("/v1/completions", json={"model": "tiny", "prompt": "the same start, then more"})
    c.simulate_post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers={"X-Session-ID": "s-9"})
    _with_routing(backend, RoutingSettings(policy="prefix", prefix_chars=14))
    c.simulate_post("/v1/completions", json={"model": "tiny", "prompt": "the same start, then more"})
    c.simulate_post("/v1/chat/completions", json=chat_body(messages=[{"role": "system", "content": "Be brief"},
                                                                     {"role": "user", "content": "hi"}]))
    _with_routing(backend, RoutingSettings(session_affinity=False))
    c.simulate_post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers={"X-Session-ID": "s-9"})
    assert backend.keys == [None, "session:s-9", "prefix:the same start", "prefix:system: Be bri", None]


# --------------------------------------------------------------------------- CORS


def test_browser_pages_of_the_configured_origins_may_call_the_api() -> None:
    """--cors-origins: a page's preflight (no credentials, as browsers send it) is answered without a key;
    its real requests need one, and every answer, a 401 included, lets the page read it."""
    c = client_for(FakeBackend(), "sk-good", cors_origins="https://app.example.com")
    page = {"Origin": "https://app.example.com"}
    pre = c.simulate_options("/v1/chat/completions", headers=dict(
        page, **{"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}))
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    ok = c.simulate_post("/v1/chat/completions", json=chat_body(), headers=dict(page, **KEY))
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
    refused = c.simulate_post("/v1/chat/completions", json=chat_body(), headers=page)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example.com"
    other = c.simulate_post("/v1/chat/completions", json=chat_body(),
                            headers=dict(KEY, Origin="https://evil.example"))
    assert "access-control-allow-origin" not in other.headers  # the browser keeps the answer from that page


def test_without_cors_origins_no_page_may_read_an_answer() -> None:
    """The default (unlike `vllm serve`'s *): a keyless proxy on loopback must not serve any page the
    user happens to open."""
    c = client_for(FakeBackend())
    r = c.simulate_post("/v1/chat/completions", json=chat_body(), headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    everyone = client_for(FakeBackend(), cors_origins="*")
    r = everyone.simulate_post("/v1/chat/completions", json=chat_body(), headers={"Origin": "https://a.example"})
    assert r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("origins", ["app.example.com", "https://app.example.com/path", "ftp://x"])
def test_a_cors_origin_must_be_an_origin(origins: str) -> None:
    with pytest.raises(ValueError, match="--cors-origins"):
        ProxyConfig(**dict(BASE, cors_origins=origins))
