"""The proxy over HTTPS (`tokenrelay up --certfile --keyfile`, a self-signed certificate made here), and
`--protect-health` with API keys: the launcher still sees its proxy come up."""
from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest

from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 1,
        "engine_args": {"ttft_ms": 5, "itl_ms": 5, "tokens": 8}}
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_proxy_with_api_keys_and_protected_health(tmp_path):
    cert, key = self_signed(tmp_path)
    stack = Stack(tmp_path, [MOCK], tls=(cert, key), api_key="sk-test",
                  env={"TOKENRELAY_API_KEYS": "sk-test", "TOKENRELAY_PROXY_PROTECT_HEALTH": "1"})
    try:
        stack.start()
        assert stack.base_url.startswith("https://")
        r = httpx.post(stack.base_url + "/v1/chat/completions", json=CHAT, timeout=10, **stack.http)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=dict(CHAT, stream=True),
                          timeout=10, **stack.http) as s:  # SSE through TLS (no direct socket writes)
            lines = [x for x in s.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
        no_key = {"verify": stack.http["verify"]}
        assert httpx.get(stack.base_url + "/ready", **no_key).status_code == 401  # health protected
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no HTTP answer
            httpx.get(stack.base_url.replace("https:", "http:") + "/ready", timeout=3)
        # the launcher's own probe used the key: it announced the stack (before the fix: 401 forever)
        wait_for(lambda: "[startup] serving on https://127.0.0.1:%d" % stack.http_port in stack.log(), 10,
                 "the launcher's announcement")
    finally:
        stack.stop()
