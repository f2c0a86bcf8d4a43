"""proxy.gunicorn_hooks: gunicorn's own errors as OpenAI JSON (pure)."""
from __future__ import annotations

import json

from proxy.gunicorn_hooks import json_error_response


def test_a_server_error_is_a_whole_http_response_with_an_openai_body_and_a_request_id() -> None:
    raw = json_error_response(431, "Request Header Fields Too Large", "Error parsing headers: 'limit'")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Connection"] == "close" and headers["Content-Type"] == "application/json"
    assert headers["X-Request-ID"].startswith("err-") and int(headers["Content-Length"]) == len(body)
    err = json.loads(body)["error"]
    assert err["code"] == "request_header_fields_too_large" and err["type"] == "invalid_request_error"
    assert "Error parsing headers" in err["message"]
