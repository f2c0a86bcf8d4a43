"""Hostile or broken clients on a real stack (one proxy worker, API keys on, mock engine): each costs only
itself. A 100 MB upload is refused at once and never stalls the worker's other streams; a body that stops
midway is a 408 (--body-timeout); deeply nested JSON is a 400; chunked bodies work; the errors gunicorn itself
makes are OpenAI JSON with an X-Request-ID.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 1,
        "engine_args": {"ttft_ms": 10, "itl_ms": 10, "tokens": 300}}
KEY = {"Authorization": "Bearer sk-team"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    tmp: Path = tmp_path_factory.mktemp("hostile")
    keys = tmp / "keys.txt"
    keys.write_text("sk-team\n")
    s = Stack(tmp, [MOCK], workers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENRELAY_PROXY_API_KEYS_FILE", str(keys))
        mp.setenv("TOKENRELAY_PROXY_BODY_TIMEOUT", "1")
        s.start()
    yield s
    s.stop()


def json_error(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 %d" % status), lines[0]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"].startswith("application/json") and headers["x-request-id"]
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def send_raw(stack: Stack, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


class Streams:
    """Clients streaming long completions with the key; the longest pause between two chunks seen."""

    def __init__(self, stack: Stack, n: int) -> None:
        self.url = stack.base_url + "/v1/completions"
        self.gaps: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        body = {"model": "mock", "prompt": "steady", "stream": True}
        with httpx.Client(timeout=30, headers=KEY) as http:
            while not self._stop.is_set():
                with http.stream("POST", self.url, json=body) as r:
                    if r.status_code != 200:
                        self.failures += 1
                        continue
                    last = None
                    for _ in r.iter_raw():
                        now = time.monotonic()
                        if last is not None:
                            self.gaps.append(now - last)
                        last = now

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(30)


def upload(stack: Stack, headers: bytes, size: int) -> tuple[float, bytes, int]:
    """POST a `size`-byte body as fast as the socket takes it; returns (seconds to the response's first
    byte, the response, bytes the proxy took before it closed)."""
    sock = socket.create_connection(("127.0.0.1", stack.http_port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n%s\r\n" % (size, headers))
    start = time.monotonic()
    got: list[bytes] = []
    first: list[float] = []

    def reader() -> None:
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                if not first:
                    first.append(time.monotonic() - start)
                got.append(data)
        except OSError:
            return
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sent = 0
    block = b"x" * (1 << 20)
    try:
        while sent < size:
            sent += sock.send(block[: size - sent])
    except OSError:
        pass  # the proxy closed after refusing it: expected
    t.join(10)
    sock.close()
    return (first[0] if first else float("inf")), b"".join(got), sent


@pytest.mark.parametrize("auth", [KEY, {}], ids=["413", "401"])
def test_a_100mb_upload_is_refused_at_once_and_does_not_stall_other_streams(stack: Stack, auth: dict) -> None:
    streams = Streams(stack, 5)
    time.sleep(1.0)  # the streams are under way
    headers = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in auth.items())
    before = len(streams.gaps)
    took, response, sent = upload(stack, headers, 100 << 20)
    time.sleep(0.5)
    during = streams.gaps[before:]
    streams.stop()
    print("\n[hostile] 100 MB upload %s: response after %.3fs, %d MB taken, longest gap of 5 streams %.3fs"
          % (auth and "with key" or "without key", took, sent >> 20, max(during)))
    json_error(response, 413 if auth else 401)
    assert took < 0.5  # the target is 50 ms; a shared 2-core machine gets slack
    assert max(during) < 0.5  # streams at 10 ms per token were not held (6.7 s before); 2 shared cores
    assert sent < 50 << 20  # the proxy did not read the whole body
    assert streams.failures == 0


def test_a_body_that_stops_midway_is_a_408_and_the_connection_closes(stack: Stack) -> None:
    """The client sends its headers and part of its body, then nothing. It used to hold its connection
    (a slot of --worker-connections) for as long as it liked; now --body-timeout (1 s here) ends it."""
    start = time.monotonic()
    raw = send_raw(stack, b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sk-team\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ", timeout=10)
    took = time.monotonic() - start
    err = json_error(raw, 408)  # and send_raw returned: the proxy closed the connection
    assert err["code"] == "request_timeout" and err["message"] == "request body stalled: no data for 1s"
    assert 0.9 < took < 5.0
    assert "POST /v1/completions -> 408 request body stalled" in stack.log()


def test_a_malformed_chunked_body_is_a_400(stack: Stack) -> None:
    """A chunk size that is not hex was a 500 (internal proxy error: InvalidChunkSize) and a traceback."""
    raw = send_raw(stack, b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sk-team\r\n"
                          b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
    err = json_error(raw, 400)  # and send_raw returned: the connection closed
    assert err["message"] == "malformed chunked request body: Invalid chunk size: b'zz'"
    assert "Traceback" not in stack.log()


def test_deeply_nested_json_is_a_400(stack: Stack) -> None:
    for body in (b"[" * 100000 + b"]" * 100000,
                 b'{"model": "mock", "prompt": "x", "user": ' + b"[" * 100000 + b"]" * 100000 + b"}"):
        r = httpx.post(stack.base_url + "/v1/completions", content=body, headers=dict(KEY, **{
            "Content-Type": "application/json"}))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in stack.log() and "RecursionError" not in stack.log()


def test_a_chunked_request_body_is_accepted(stack: Stack) -> None:
    def body():
        yield b'{"model": "mock", '
        yield b'"prompt": "chunked", "max_tokens": 3}'
    r = httpx.post(stack.base_url + "/v1/completions", content=body(), headers=dict(KEY, **{
        "Content-Type": "application/json"}))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["text"].split()) == 3


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"X-Big: y\r\n" * 200 + b"\r\n", 431),
    (b"GET /he\x00alth HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nX-Request-ID: a\x01b\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n", 400),
], ids=["414", "431", "nul-in-path", "control-char-header", "bad-header-name"])
def test_errors_gunicorn_makes_are_openai_json(stack: Stack, request_bytes: bytes, status: int) -> None:
    json_error(send_raw(stack, request_bytes), status)


def ttft_p50(stack: Stack, n: int = 15) -> float:
    times = []
    with httpx.Client(timeout=30, headers=KEY) as http:
        for _ in range(n):
            start = time.monotonic()
            with http.stream("POST", stack.base_url + "/v1/completions",
                             json={"model": "mock", "prompt": "t", "max_tokens": 2, "stream": True}) as r:
                first = None
                for line in r.iter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.monotonic() - start
                times.append(first)
    return sorted(times)[len(times) // 2]


class Slowloris:
    """`n` connections from 127.0.0.5 that send half a request head and never finish it; each one the
    proxy closes is opened again at once (one epoll set, so this side costs little CPU)."""

    def __init__(self, stack: Stack, n: int) -> None:
        self.port = stack.http_port
        self.n = n
        self.opened = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self, sel) -> None:
        import selectors
        sock = socket.socket()
        sock.bind(("127.0.0.5", 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        sel.register(sock, selectors.EVENT_WRITE)
        self.opened += 1

    def _run(self) -> None:
        import selectors
        sel = selectors.DefaultSelector()
        live = 0
        while not self._stop.is_set():
            while live < self.n:
                self._open(sel)
                live += 1
            for key, events in sel.select(0.2):
                sock = key.fileobj
                try:
                    if events & selectors.EVENT_WRITE:
                        sock.send(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n")
                        sel.modify(sock, selectors.EVENT_READ)
                        continue
                    if sock.recv(4096):
                        continue
                except OSError:
                    pass
                sel.unregister(sock)
                sock.close()
                live -= 1
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


def test_2500_slowloris_connections_cost_other_clients_little(stack: Stack) -> None:
    normal = ttft_p50(stack)
    flood = Slowloris(stack, 2500)
    try:
        time.sleep(3.0)  # the flood is on: connections opened, closed by the proxy, opened again
        under = ttft_p50(stack)
    finally:
        flood.stop()
    parked = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(stack.base_url + "/metrics").text.splitlines()
                 if line.startswith("tokenrelay_proxy_connections_parked_total"))
    print("\n[hostile] 2500 slowloris connections: TTFT p50 %.1f ms -> %.1f ms; %d connections opened, %d parked "
          "by the proxy" % (normal * 1000, under * 1000, flood.opened, parked))
    assert parked > 0
    assert under <= 2 * normal + 0.01  # the issue saw 0.05 s -> 1.9 s; closing them instead: 10-20x


def test_a_slow_body_that_keeps_coming_is_not_a_stall(stack: Stack) -> None:
    """--body-timeout (1 s here) bounds a pause, not the time one 64 KiB piece takes: a 150 KB prompt
    sent 8 KB every 0.25 s (4.6 s in all, ~2 s per 64 KiB) is served."""
    body = json.dumps({"model": "mock", "prompt": "x" * 150_000, "max_tokens": 1}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer sk-team\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=20) as sock:
        sock.sendall(head)
        for i in range(0, len(body), 8192):
            sock.sendall(body[i:i + 8192])
            time.sleep(0.25)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200"), out[:300]
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["usage"]["completion_tokens"] == 1
