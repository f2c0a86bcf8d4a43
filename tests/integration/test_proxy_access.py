"""API keys, per-key rate limits and bad input on a real stack (mock engine).

The proxy gets its keys the way `tokenrelay up` passes them on: the environment (a keys file through
TOKENRELAY_PROXY_API_KEYS_FILE, more keys in TOKENRELAY_API_KEYS). Every error must be OpenAI's JSON
shape with an X-Request-ID, and leave a log line with the request id.
"""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 1,
        "engine_args": {"ttft_ms": 5, "itl_ms": 5, "tokens": 4}}
GOOD = {"Authorization": "Bearer sk-team"}
LIMITED = {"Authorization": "Bearer sk-limited"}
MAX_BODY = 4096


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("access")
    keys = tmp / "keys.txt"
    keys.write_text("# key  requests/minute\nsk-team\nsk-limited 3\n")
    s = Stack(tmp, [MOCK], workers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENRELAY_PROXY_API_KEYS_FILE", str(keys))
        mp.setenv("TOKENRELAY_API_KEYS", "sk-from-env")
        mp.setenv("TOKENRELAY_PROXY_MAX_BODY_BYTES", str(MAX_BODY))
        s.start()
    yield s
    s.stop()


def error_of(r: httpx.Response, status: int, code: object = None, param: object = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and err["param"] == param
    assert r.headers["x-request-id"]
    return err


def test_v1_needs_a_key_and_health_stays_open(stack: Stack) -> None:
    url = stack.base_url + "/v1/completions"
    body = {"model": "mock", "prompt": "hi"}
    error_of(httpx.post(url, json=body), 401, "invalid_api_key")
    error_of(httpx.post(url, json=body, headers={"Authorization": "Bearer sk-nope"}), 401, "invalid_api_key")
    error_of(httpx.get(stack.base_url + "/v1/models"), 401, "invalid_api_key")
    assert httpx.post(url, json=body, headers=GOOD).status_code == 200
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer sk-from-env"}).status_code == 200
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert httpx.get(stack.base_url + path).status_code == 200, path
    assert "sk-team" not in stack.log() and "sk-nope" not in stack.log()  # keys never reach the logs


def test_per_key_rate_limit(stack: Stack) -> None:
    url = stack.base_url + "/v1/models"
    assert [httpx.get(url, headers=LIMITED).status_code for _ in range(3)] == [200, 200, 200]
    r = httpx.get(url, headers=LIMITED)
    err = error_of(r, 429, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    assert httpx.get(url, headers=GOOD).status_code == 200  # other keys are not affected


@pytest.mark.parametrize("method, path, kwargs, status, code, param", [
    ("POST", "/v1/completions", {"content": b"x" * (MAX_BODY + 1),
                                 "headers": {"Content-Type": "application/json"}}, 413, "body_too_large", None),
    ("POST", "/v1/completions", {"content": b"[1, 2]", "headers": {"Content-Type": "application/json"}},
     400, None, None),
    ("POST", "/v1/completions", {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
     400, None, None),
    ("POST", "/v1/completions", {"json": {"model": "mock", "prompt": "x", "temperature": "hot"}},
     400, None, "temperature"),
    ("POST", "/v1/chat/completions", {"json": {"model": "mock", "messages": [{"role": "user", "content": 5}]}},
     400, None, "messages[0].content"),
    ("POST", "/v1/completions", {"json": {"model": "gpt-9", "prompt": "x"}}, 404, "model_not_found", "model"),
    ("GET", "/v1/completions", {}, 405, "method_not_allowed", None),
    ("DELETE", "/v1/models", {}, 405, "method_not_allowed", None),
    ("POST", "/v1/completions", {"content": b"model=mock&prompt=x",
                                 "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     415, "unsupported_media_type", None),
    ("POST", "/v1/chat/mock", {"content": b"{}", "headers": {"Content-Type": "application/json"}},
     415, "unsupported_media_type", None),
    ("GET", "/v2/nothing", {}, 404, "not_found", None),
])
def test_bad_input_gets_a_precise_openai_error_a_request_id_and_a_log_line(
        stack: Stack, method: str, path: str, kwargs: dict, status: int, code: object, param: object) -> None:
    headers = dict(kwargs.pop("headers", {}), **GOOD, **{"X-Request-ID": "bad-%s-%d" % (method, status)})
    r = httpx.request(method, stack.base_url + path, headers=headers, **kwargs)
    error_of(r, status, code, param)
    assert r.headers["x-request-id"] == headers["X-Request-ID"]  # the client's id is echoed
    if status == 405:
        assert r.headers["allow"]
    log = stack.log()
    assert "%s %s -> %d" % (method, path, status) in log  # each error is logged with the request id


def test_generated_request_id_when_the_client_sends_none(stack: Stack) -> None:
    r = httpx.get(stack.base_url + "/health")
    assert r.headers["x-request-id"].startswith("w")
    r = httpx.get(stack.base_url + "/health", headers={"X-Request-ID": "x" * 500})  # too long: replaced
    assert r.headers["x-request-id"] != "x" * 500


def test_openapi_document_is_served(stack: Stack, tmp_path: Path) -> None:
    doc = httpx.get(stack.base_url + "/openapi.json").json()
    assert doc["openapi"] == "3.1.0" and "/v1/chat/completions" in doc["paths"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_a_stack_bound_beyond_loopback_needs_keys_or_open_api(tmp_path: Path) -> None:
    # an operator exposing the port with no key gets a refusal that says what to do, not an open endpoint
    (tmp_path / "refused").mkdir()
    (tmp_path / "open").mkdir()
    refused = Stack(tmp_path / "refused", [MOCK], up_args=("--bind", "0.0.0.0"))
    with pytest.raises(AssertionError, match="stack exited with 1"):
        refused.start(timeout=60)
    log = refused.log()
    assert "0.0.0.0:%d is reachable from other hosts and no API key is set" % refused.http_port in log
    assert "--open-api" in log
    refused.stop()
    # on purpose: it serves without a key (reached here on loopback) and says so at WARNING
    open_ = Stack(tmp_path / "open", [MOCK], up_args=("--bind", "0.0.0.0", "--open-api")).start()
    try:
        r = httpx.post(open_.base_url + "/v1/completions", json={"model": "mock", "prompt": "hi"}, timeout=10)
        assert r.status_code == 200, r.text
        assert "WARNING" in open_.log() and "takes requests from anyone who reaches it" in open_.log()
    finally:
        open_.stop()
