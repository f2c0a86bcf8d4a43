"""The proxy's HTTP edge against slow and hostile clients, as an attacker would probe it (real stack, one
proxy worker, API keys on, mock engine; short deadlines: --body-timeout 1, --body-min-rate 10000,
--header-timeout 2).

  * a body trickled just inside each pause is a 408 at its pace deadline, and the connection closes;
  * every answer after which the proxy reads no more of the connection says `Connection: close` and
    closes it, and nothing the client sent after it is ever parsed as a request (request smuggling);
    a refused request whose small body was read keeps its connection, and a request pipelined behind
    a streaming one is answered after it;
  * thousands of requests pipelined in one burst, or a body of a million 1-byte chunks, do not hold
    the worker's other streams;
  * Expect: 100-continue: a request refused before its body is wanted gets no "100 Continue";
  * request heads sent a byte at a time (slowloris) are closed at --header-timeout while an honest
    client is served;
  * a streaming client that stops reading (but keeps its connection open) is cut off at --send-timeout
    (2 s here): its request is aborted and its connection closed, with a log line and a metric.
"""
from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import Stack, wait_for
from tests.integration.test_hostile_clients import KEY, MOCK, Streams, json_error

pytestmark = pytest.mark.integration

AUTH = b"Authorization: Bearer sk-team\r\n"
JSON = b"Content-Type: application/json\r\n"
# fast, long streams: more than a client's kernel buffers hold, so a client that reads nothing stalls them
FLOOD = {"name": "flood", "engine": "mock", "model": "mock", "replicas": 1,
         "engine_args": {"ttft_ms": 10, "itl_ms": 0, "tokens": 100000, "max_context": 200000}}
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")  # a status line (the bodies here never hold one)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    tmp: Path = tmp_path_factory.mktemp("edge")
    keys = tmp / "keys.txt"
    keys.write_text("sk-team\n")
    s = Stack(tmp, [MOCK, FLOOD], workers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENRELAY_PROXY_API_KEYS_FILE", str(keys))
        mp.setenv("TOKENRELAY_PROXY_BODY_TIMEOUT", "1")
        mp.setenv("TOKENRELAY_PROXY_BODY_MIN_RATE", "10000")
        mp.setenv("TOKENRELAY_PROXY_HEADER_TIMEOUT", "2")
        mp.setenv("TOKENRELAY_PROXY_SEND_TIMEOUT", "2")
        mp.setenv("TOKENRELAY_PROXY_CORS_ORIGINS", "https://app.example.com")
        s.start()
    yield s
    s.stop()


def inner_request(model: str) -> bytes:
    """A whole, valid request naming `model`: were it ever parsed, the proxy would answer it (404) and
    log `The model 'MODEL' does not exist`."""
    body = b'{"model": "%s", "prompt": "x", "max_tokens": 1}' % model.encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n" + AUTH + JSON
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the proxy sends until it closes the connection (a reset counts as closed); a socket
    timeout (the test's bound) means it kept the connection open."""
    out = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not data:
            return out
        out += data


def headers_of(raw: bytes) -> dict[str, str]:
    lines = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_a_body_trickled_inside_every_pause_is_a_408_at_its_pace_deadline(stack: Stack) -> None:
    """One byte every 0.3 s never trips --body-timeout (1 s). A 10,000-byte body at --body-min-rate
    10,000 bytes/s may take 1 + 1 s: the trickle (33 s for the whole body) ends there."""
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n" + AUTH + JSON + b"Content-Length: 10000\r\n\r\n")
        start = time.monotonic()
        sock.settimeout(0.3)
        raw = b""
        while not raw and time.monotonic() - start < 10:
            sock.sendall(b" ")
            try:
                raw = sock.recv(65536)
            except socket.timeout:
                continue
        took = time.monotonic() - start
        sock.settimeout(5)
        raw += read_to_end(sock)
    err = json_error(raw, 408)
    assert err["code"] == "request_timeout"
    assert err["message"].startswith("request body too slow: it must average 10000 bytes/s after the first 1s")
    assert headers_of(raw)["connection"] == "close"
    assert 1.8 < took < 4.0
    assert "POST /v1/completions -> 408 request body too slow" in stack.log()


def smuggle(stack: Stack, head: bytes, before: bytes, after: bytes = b"") -> bytes:
    """Send `head` + `before`; when `after` is given, wait for the answer first, then send it (the
    rest of a body the proxy gave up on). Returns all the proxy sent until it closed."""
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=8) as sock:
        sock.sendall(head + before)
        raw = b""
        if after:
            raw = sock.recv(65536)
            try:
                sock.sendall(after)
            except OSError:
                pass  # already closed: nothing of it can be parsed
        return raw + read_to_end(sock)


POST = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n"


@pytest.mark.parametrize("status, head, before, after", [
    (413, POST + AUTH + JSON + b"Content-Length: 20000000\r\n\r\n", b"INNER", b""),
    (413, POST + AUTH + JSON + b"Content-Length: 99999999999999999999999999\r\n\r\n", b"INNER", b""),
    (401, POST + JSON + b"Content-Length: 200000\r\n\r\n", b"INNER", b""),
    (400, POST + AUTH + JSON + b"Transfer-Encoding: chunked\r\n\r\n", b"zz\r\nINNER", b""),
    (408, POST + AUTH + JSON + b"Content-Length: 100000\r\n\r\n", b'{"model', b"x" * 10 + b"INNER"),
], ids=["413-content-length", "413-absurd-content-length", "401-big-body", "400-broken-chunks", "408-stall"])
def test_an_answer_that_ends_the_connection_says_close_and_nothing_after_it_is_parsed(
        stack: Stack, status: int, head: bytes, before: bytes, after: bytes) -> None:
    """The refused body (or what follows a 408) holds a whole request. It must never be executed:
    one answer, `Connection: close` (it said keep-alive before), then the connection ends."""
    model = "smuggled-%d-%d" % (status, time.monotonic_ns())
    inner = inner_request(model)
    raw = smuggle(stack, head, before.replace(b"INNER", inner), after.replace(b"INNER", inner))
    assert [int(s) for s in STATUS_LINE.findall(raw)] == [status], raw[:600]
    json_error(raw, status)
    assert headers_of(raw)["connection"] == "close"
    assert model not in stack.log()


def test_a_refused_request_whose_body_was_read_keeps_its_connection(stack: Stack) -> None:
    """The control for the test above: a small body is read (or skipped by its length), so the
    connection stays honest, and the request behind it is answered: detection of a served inner
    request works."""
    model = "pipelined-%d" % time.monotonic_ns()
    raw = smuggle(stack, inner_request("no-such-model") + inner_request(model)
                  + b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", b"")
    assert [int(s) for s in STATUS_LINE.findall(raw)] == [404, 404, 200], raw[:600]
    assert "Connection: keep-alive" in raw.decode("latin-1").split("\r\n\r\n")[0]
    assert "The model '%s' does not exist" % model in stack.log()


def test_a_request_pipelined_behind_a_stream_is_answered_after_it(stack: Stack) -> None:
    body = b'{"model": "mock", "prompt": "a", "max_tokens": 5, "stream": true}'
    stream = POST + AUTH + JSON + b"Content-Length: %d\r\n\r\n" % len(body) + body
    raw = smuggle(stack, stream + b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", b"")
    first, _, second = raw.partition(b"data: [DONE]")
    assert [int(s) for s in STATUS_LINE.findall(first)] == [200] and first.count(b'"text":') == 6
    assert second.startswith(b"\n\n\r\n0\r\n\r\nHTTP/1.1 200 ") and second.endswith(b'{"status":"ok"}')


def send_beside_streams(stack: Stack, streams: int, data: bytes) -> tuple[bytes, float, float, int]:
    """Send `data` on one connection (it ends with `Connection: close`) while `streams` streams run:
    (everything answered, seconds it took, the longest gap between the streams' tokens meanwhile,
    the streams' failures)."""
    running = Streams(stack, streams)
    try:
        while len(running.gaps) < 20:  # the streams are under way (bounded by the streams' own timeouts)
            time.sleep(0.05)
        before = len(running.gaps)
        with socket.create_connection(("127.0.0.1", stack.http_port), timeout=20) as sock:
            start = time.monotonic()
            sock.sendall(data)
            raw = read_to_end(sock)
            took = time.monotonic() - start
        during = running.gaps[before:]
    finally:
        running.stop()
    return raw, took, max(during), running.failures


def test_a_burst_of_pipelined_requests_does_not_hold_the_other_streams(stack: Stack) -> None:
    """10,000 GET /health in one send are all in the socket buffer, and gevent's recv does not yield
    while data is there: answering them held every stream of the worker (20,000: a 1.9 s gap)."""
    n = 10_000
    raw, took, gap, failures = send_beside_streams(
        stack, 3, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" * (n - 1)
        + b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    print("\n[edge] %d pipelined requests answered in %.2fs; longest gap of 3 streams meanwhile %.3fs"
          % (n, took, gap))
    assert raw.count(b"HTTP/1.1 200 ") == n
    assert gap < 0.3 and failures == 0


def test_a_body_of_tiny_chunks_does_not_hold_the_other_streams(stack: Stack) -> None:
    """2,000,000 chunks of one byte (12 MB on the wire, a 2 MB JSON body): gunicorn decodes chunk
    framing in Python, and 64 KiB reads of it held every stream of the worker for the whole 3.4 s
    (reads sized to 5 ms with gevent.sleep(0) between them: 0.26 s, see proxy/loop_turns.py)."""
    n = 2_000_000
    prefix = b'{"model": "mock", "max_tokens": 1, "prompt": "a"'
    body = (b"%x\r\n%s\r\n" % (len(prefix), prefix) + b"1\r\n \r\n" * n + b"1\r\n}\r\n0\r\n\r\n")
    raw, took, gap, failures = send_beside_streams(
        stack, 3, POST + AUTH + JSON + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
    print("\n[edge] %d one-byte chunks read in %.2fs; longest gap of 3 streams meanwhile %.3fs"
          % (n, took, gap))
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
    assert gap < 0.15 and failures == 0


def test_a_burst_of_the_largest_request_heads_does_not_hold_the_other_streams(stack: Stack) -> None:
    """20 heads of 98 headers of 8,000 bytes (785 KB each, within gunicorn's limits) pipelined: each
    takes gunicorn ~65 ms to parse, and with gevent.sleep(0) between them they held the worker's one
    other stream for all 20 (1.3 s): gevent polls I/O once per 50 callbacks, and a lone stream makes
    few (proxy/loop_turns.py)."""
    head = (b"GET /health HTTP/1.1\r\nHost: t\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 8000) for i in range(98)) + b"\r\n")
    raw, took, gap, failures = send_beside_streams(
        stack, 1, head * 20 + b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    print("\n[edge] 20 heads of 785 KB answered in %.2fs; longest gap of a stream meanwhile %.3fs"
          % (took, gap))
    assert raw.count(b"HTTP/1.1 200 ") == 21
    assert gap < 0.25 and failures == 0  # one head parse is ~65 ms: the floor


@pytest.mark.parametrize("status, auth, length", [(401, b"", 300000), (413, AUTH, 30000000)], ids=["401", "413"])
def test_expect_100_continue_refused_before_the_body_gets_no_continue(stack: Stack, status: int, auth: bytes,
                                                                      length: int) -> None:
    """gunicorn answered "100 Continue" before the app ran, so a client sent its whole body even when
    the answer was a 401 or a 413."""
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=5) as sock:
        sock.sendall(POST + auth + JSON + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length)
        raw = read_to_end(sock)
    assert [int(s) for s in STATUS_LINE.findall(raw)] == [status], raw[:300]
    json_error(raw, status)
    assert headers_of(raw)["connection"] == "close"


def test_expect_100_continue_gets_it_when_the_body_is_wanted(stack: Stack) -> None:
    body = b'{"model": "mock", "prompt": "a", "max_tokens": 2}'
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=5) as sock:
        sock.sendall(POST + AUTH + JSON + b"Expect: 100-continue\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        raw = read_to_end(sock)
    assert raw.startswith(b"HTTP/1.1 200 ") and b'"completion_tokens":2' in raw


def test_slow_request_heads_are_closed_at_the_header_deadline_while_an_honest_client_is_served(
        stack: Stack) -> None:
    """50 connections send a request head one byte every 0.1 s and never finish it (slowloris). The
    proxy closes each at --header-timeout (2 s, counted from the connection's start), whatever it still
    receives; an honest request meanwhile gets its answer."""
    n = 50
    head = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 1000
    socks = [socket.create_connection(("127.0.0.1", stack.http_port), timeout=2) for _ in range(n)]
    opened = time.monotonic()
    closed: dict[int, float] = {}
    honest = None
    try:
        for s in socks:
            s.setblocking(False)
        i = 0
        while len(closed) < n and time.monotonic() - opened < 8:
            for j, s in enumerate(socks):
                if j in closed:
                    continue
                try:
                    if s.recv(1024) == b"":
                        closed[j] = time.monotonic() - opened
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    closed[j] = time.monotonic() - opened
                    continue
                try:
                    s.send(head[i:i + 1])
                except OSError:
                    closed[j] = time.monotonic() - opened
            i += 1
            if honest is None and time.monotonic() - opened > 0.5:
                honest = httpx.post(stack.base_url + "/v1/completions", headers=KEY, timeout=1.5,
                                    json={"model": "mock", "prompt": "a", "max_tokens": 2})
            time.sleep(0.1)  # the drip's pace
    finally:
        for s in socks:
            s.close()
    assert honest is not None and honest.status_code == 200, honest
    assert len(closed) == n, "%d of %d slow connections still open after 8 s" % (n - len(closed), n)
    print("\n[edge] %d slow heads closed after %.2f-%.2f s (--header-timeout 2)"
          % (n, min(closed.values()), max(closed.values())))
    assert 1.8 < min(closed.values()) and max(closed.values()) < 4.0


def test_a_stream_whose_client_stops_reading_is_cut_off_at_the_send_timeout(stack: Stack) -> None:
    """The client keeps its connection open and reads nothing (TCP then holds a zero window forever):
    the proxy's write waits --send-timeout (2 s) at most, then the request is aborted at the replica and
    the connection closes. Without the bound the greenlet and the connection were held forever."""
    stalled = "tokenrelay_proxy_clients_stalled_total"
    before = proxy_metric(stack, stalled)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", stack.http_port))
    body = b'{"model": "flood", "prompt": "x", "stream": true}'
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n" + AUTH + JSON
                 + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    started = time.monotonic()
    try:
        wait_for(lambda: proxy_metric(stack, stalled) > before, 30,
                 "the proxy to give up on the client that reads nothing")
        given_up = time.monotonic() - started
        sock.settimeout(10)
        raw = read_to_end(sock)  # what the kernel buffers held, then the end of the connection
    finally:
        sock.close()
    assert raw.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in raw
    assert 2.0 <= given_up < 20, given_up  # at most two writes' worth of --send-timeout, once it stalls
    assert "did not take a response write within 2s (--send-timeout)" in stack.log()
    # the replica stopped generating for it (the flood is 100,000 tokens)
    wait_for(lambda: proxy_metric(stack, "tokenrelay_proxy_in_flight_requests") == 0, 10,
             "the request to end at the proxy")


def proxy_metric(stack: Stack, name: str) -> float:
    """The sum of a proxy metric's samples over its labels."""
    text = httpx.get(stack.base_url + "/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)



def test_a_browser_page_of_an_allowed_origin_streams_through_its_preflight(stack: Stack) -> None:
    """Under gunicorn: the preflight is answered without a key, and a stream (direct writes) carries the
    CORS headers the browser needs to read it."""
    page = {"Origin": "https://app.example.com"}
    pre = httpx.options(stack.base_url + "/v1/completions", headers=dict(
        page, **{"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}))
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example.com"
    body = {"model": "mock", "prompt": "x", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", stack.base_url + "/v1/completions", json=body, headers=dict(page, **KEY)) as r:
        text = r.read().decode()
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "data: [DONE]" in text
