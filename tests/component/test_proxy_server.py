"""Component tests: the real proxy (gunicorn + gevent, `sys.executable -m proxy`) against a fake head and
fake replicas on real ZeroMQ sockets (see test_proxy_fakes.py).

The proxy runs as a subprocess with one worker; its log goes to a file in the test's temp dir and is
printed when startup fails. Every wait is a poll with a deadline; teardown always terminates, then kills.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_proxy_fakes import TEXT, FakeHead, FakeReplica, wait_for  # noqa: E402

from runtime import authz, curve, keyring  # noqa: E402
from runtime.protocol import DeploymentRoute  # noqa: E402
from runtime.zap import ZapHandler  # noqa: E402
from tests.support import free_port  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.integration]  # starts the proxy as a process

REPO = Path(__file__).resolve().parents[2]
STALE_AFTER = 1.5


class Cluster:
    def __init__(self, head: FakeHead, replicas: dict[str, FakeReplica], base: str, port: int,
                 log_path: Path) -> None:
        self.head = head
        self.replicas = replicas
        self.base = base
        self.port = port
        self.log_path = log_path

    def deps(self, **overrides: list[str]) -> list[DeploymentRoute]:
        layout = {"tiny": ["r1"], "fragile": ["r2"], "leaving": ["r3"], "doomed": ["r4"], "empty": []}
        layout.update(overrides)
        return [DeploymentRoute(name, "fake", "fake-model", [self.replicas[r].route() for r in rids])
                for name, rids in layout.items()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_proxy(head_control: str, port: int, log_path: Path, metrics_dir: Path,
                *extra: str) -> subprocess.Popen:
    """`python -m proxy` with one worker, logging to `log_path`; returns once /ready is 200. The fakes are
    plain unless `extra` names a --curve-dir, so the proxy runs --insecure otherwise."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    env.pop("TOKENRELAY_CURVE_DIR", None)
    if "--curve-dir" not in extra:
        extra = extra + ("--insecure",)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--head", head_control, "--bind", "127.0.0.1:%d" % port,
             "--workers", "1", "--stale-after", str(STALE_AFTER), "--first-token-timeout", "10",
             "--log-level", "DEBUG", *extra],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    base = "http://127.0.0.1:%d" % port
    try:
        wait_for(lambda: proc.poll() is not None or _ready(base), 30, "proxy /ready")
        assert proc.poll() is None, "proxy exited with %s" % proc.returncode
    except BaseException:
        stop_proxy(proc)
        print(log_path.read_text(errors="replace"))
        raise
    return proc


def stop_proxy(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    replicas = {rid: FakeReplica(rid).start_and_wait() for rid in ("r1", "r2", "r3", "r4")}
    head = FakeHead().start_and_wait()
    port = free_port()
    log_path = tmp_path_factory.mktemp("proxy") / "proxy.log"
    c = Cluster(head, replicas, "http://127.0.0.1:%d" % port, port, log_path)
    head.set_deployments(c.deps())
    try:
        proc = start_proxy(head.control, port, log_path, tmp_path_factory.mktemp("metrics"))
        try:
            yield c
        finally:
            stop_proxy(proc)
    finally:
        c.head.stop()
        for r in replicas.values():
            r.stop()


def chat(model: str = "tiny", content: str = "hi", **fields: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    body.update(fields)
    return body


def sse_events(text: str) -> list[Any]:
    blocks = text.split("\n\n")
    assert blocks[-1] == "", "body must end with a blank line"
    out = []
    for block in blocks[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_error(r: httpx.Response, status: int, param: Any = None, code: Any = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code
    assert r.headers.get("x-request-id")
    return err


# --------------------------------------------------------------------------- basics


def test_health_ready_models_metrics(cluster: Cluster) -> None:
    assert httpx.get(cluster.base + "/health").json() == {"status": "ok"}
    assert httpx.get(cluster.base + "/ready").json() == {"status": "ready"}
    ids = {m["id"] for m in httpx.get(cluster.base + "/v1/models").json()["data"]}
    assert ids == {"tiny", "fragile", "leaving", "doomed", "empty"}
    httpx.post(cluster.base + "/v1/chat/completions", json=chat())
    text = httpx.get(cluster.base + "/metrics").text
    assert 'tokenrelay_proxy_requests_total{deployment="tiny",status="200"}' in text
    assert "tokenrelay_proxy_time_to_first_token_seconds_bucket" in text
    assert "tokenrelay_proxy_routing_table_age_seconds" in text


def test_chat_stream_sse(cluster: Cluster) -> None:
    r = httpx.post(cluster.base + "/v1/chat/completions",
                   json=chat(stream=True, stream_options={"include_usage": True}, max_tokens=9, stop=["zz"]))
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    rid = r.headers["x-request-id"]
    assert {c["id"] for c in chunks} == {"chatcmpl-" + rid}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == TEXT
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    sent = [q for q in cluster.replicas["r1"].requests if q.request_id == rid][0]
    assert sent.params.max_tokens == 9 and sent.params.stop == ["zz"] and sent.messages[0].content == "hi"


def test_completions_stream_sse(cluster: Cluster) -> None:
    r = httpx.post(cluster.base + "/v1/completions", json={"model": "tiny", "prompt": "a b", "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == TEXT
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_non_stream_json(cluster: Cluster) -> None:
    r = httpx.post(cluster.base + "/v1/chat/completions", json=chat())
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": TEXT}
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
    r = httpx.post(cluster.base + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.json()["object"] == "text_completion" and r.json()["choices"][0]["text"] == TEXT


def test_openai_client(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=cluster.base + "/v1", api_key="unused", max_retries=0, timeout=20)
    done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content == TEXT and done.usage.total_tokens == 5
    parts, usage = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == TEXT and usage.total_tokens == 5
    comp = client.completions.create(model="tiny", prompt="x")
    assert comp.choices[0].text == TEXT
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt="x", stream=True))
    assert streamed == TEXT
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "error-before"}],
                                       stream=True)
    assert info.value.status_code == 400


def test_legacy_plain_endpoint(cluster: Cluster) -> None:
    with httpx.stream("POST", cluster.base + "/v1/chat/tiny?max_tokens=3", content=b"tell me") as r:
        assert r.status_code == 200
        assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
        assert r.headers["content-type"].startswith("text/plain")
        assert r.read().decode() == TEXT
    sent = [q for q in cluster.replicas["r1"].requests if q.request_id == r.headers["x-request-id"]][0]
    assert sent.prompt == "tell me" and sent.params.max_tokens == 3
    r = httpx.post(cluster.base + "/v1/chat/tiny", content=b"error-mid")
    assert r.status_code == 200 and r.text == "Hello\n[error] engine exploded\n"
    assert_error(httpx.post(cluster.base + "/v1/chat/tiny?max_tokens=x", content=b"hi"), 400, "max_tokens")
    assert_error(httpx.post(cluster.base + "/v1/chat/nope", content=b"hi"), 404, "model", "model_not_found")


def test_request_id_header_echoed(cluster: Cluster) -> None:
    r = httpx.post(cluster.base + "/v1/chat/completions", json=chat(), headers={"X-Request-ID": "client-42"})
    assert r.headers["x-request-id"] == "client-42"


# --------------------------------------------------------------------------- errors with a status


def test_request_errors(cluster: Cluster) -> None:
    url = cluster.base + "/v1/chat/completions"
    assert_error(httpx.post(url, json=chat(model="gpt-9")), 404, "model", "model_not_found")
    assert_error(httpx.post(url, content=b"{nope"), 400)
    assert_error(httpx.post(url, content=b"[1]"), 400)
    assert_error(httpx.post(url, json=chat(max_tokens="ten")), 400, "max_tokens")
    assert_error(httpx.post(url, json=chat(n=3)), 400, "n")
    assert_error(httpx.post(url, json={"model": "tiny"}), 400, "messages")
    assert_error(httpx.get(url), 405, None, "method_not_allowed")
    assert_error(httpx.get(cluster.base + "/v3/nothing"), 404, None, "not_found")


def test_no_replica_503(cluster: Cluster) -> None:
    r = httpx.post(cluster.base + "/v1/chat/completions", json=chat(model="empty", stream=True))
    assert_error(r, 503, None, "no_healthy_replica")
    assert r.headers["retry-after"] == "1"


def test_replica_error_before_first_token_gets_real_status(cluster: Cluster) -> None:
    r = httpx.post(cluster.base + "/v1/chat/completions", json=chat(content="error-before", stream=True))
    err = assert_error(r, 400, "prompt")
    assert err["message"] == "the replica rejects this prompt"


def test_mid_stream_error_event(cluster: Cluster) -> None:
    r = httpx.post(cluster.base + "/v1/chat/completions", json=chat(content="error-mid", stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": "engine exploded", "type": "server_error", "param": None,
                                    "code": None}}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "Hello"


# --------------------------------------------------------------------------- failure handling


def _start_slow_stream(cluster: Cluster, model: str) -> tuple[socket.socket, str]:
    """Open a raw HTTP connection, read the headers and first chunk; return (socket, request id)."""
    body = json.dumps(chat(model=model, content="slow", stream=True)).encode()
    sock = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    buf = b""
    while b"data: " not in buf:
        chunk = sock.recv(65536)
        assert chunk, "proxy closed the connection: %r" % buf
        buf += chunk
    head = buf.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    rid = [line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-request-id:")]
    return sock, rid[0]


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    buf = b""
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def test_client_disconnect_sends_abort(cluster: Cluster) -> None:
    sock, rid = _start_slow_stream(cluster, "tiny")
    assert rid not in cluster.replicas["r1"].aborts
    sock.close()
    wait_for(lambda: rid in cluster.replicas["r1"].aborts, 10, what="Abort(%s) at the replica" % rid)


def test_replica_killed_mid_stream_fails_request_then_503(cluster: Cluster) -> None:
    r = httpx.post(cluster.base + "/v1/chat/completions", json=chat(model="fragile", content="die", stream=True),
                   timeout=20)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "lost connection to replica r2" in events[-2]["error"]["message"]
    # the table still lists r2, but this worker knows its connection is down
    r = httpx.post(cluster.base + "/v1/chat/completions", json=chat(model="fragile"))
    assert_error(r, 503, None, "no_healthy_replica")


def test_replica_dead_message_fails_in_flight(cluster: Cluster) -> None:
    r = httpx.post(cluster.base + "/v1/completions", json={"model": "doomed", "prompt": "dead", "stream": True})
    events = sse_events(r.text)
    assert "CUDA error" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
    assert_error(httpx.post(cluster.base + "/v1/completions", json={"model": "doomed", "prompt": "x"}), 503,
                 None, "no_healthy_replica")


def test_replica_leaving_table_drains_its_streams(cluster: Cluster) -> None:
    """A replica leaving routing (rolling update, scale-down) gets no new requests, but its in-flight
    streams finish normally: the replica drains them."""
    sock, rid = _start_slow_stream(cluster, "leaving")
    try:
        cluster.head.set_deployments(cluster.deps(leaving=[]))
        rest = _read_until(sock, b"data: [DONE]")
        assert b'"finish_reason":"length"' in rest and b'"error"' not in rest
    finally:
        sock.close()
    assert_error(httpx.post(cluster.base + "/v1/chat/completions", json=chat(model="leaving")), 503, None,
                 "no_healthy_replica")


def test_head_down_keeps_routing_and_ready_recovers(cluster: Cluster) -> None:
    cluster.head.paused.set()
    try:
        # the head is down but the replicas are not: still ready, saying the table is stale
        wait_for(lambda: "stale" in httpx.get(cluster.base + "/ready").text, STALE_AFTER + 5,
                 "/ready to report the stale table")
        r = httpx.get(cluster.base + "/ready")
        assert r.status_code == 200 and "stale" in r.json()["reason"] and r.json()["status"] == "ready"
        r = httpx.post(cluster.base + "/v1/chat/completions", json=chat())
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == TEXT
    finally:
        cluster.head.paused.clear()
    wait_for(lambda: _ready(cluster.base), 15, "/ready to recover")
    assert "routing table stale" in cluster.log()


def test_new_head_epoch_on_new_publish_endpoint(cluster: Cluster) -> None:
    """The head restarts (same control port, new PUB port, new epoch): the proxy re-hellos and follows it."""
    old = cluster.head
    control_port = int(old.control.rsplit(":", 1)[1])
    old.stop()
    new = FakeHead(epoch=2, control_port=control_port).start_and_wait()
    cluster.head = new
    new.set_deployments(cluster.deps(tiny=[], tiny2=["r1"]))
    wait_for(lambda: "tiny2" in {m["id"] for m in httpx.get(cluster.base + "/v1/models").json()["data"]},
             20, "the new head's table")
    assert new.hellos >= 1 and new.publish != old.publish
    assert set(new.hello_endpoints) == {cluster.base.split("//")[1]}  # listed for Prometheus discovery
    r = httpx.post(cluster.base + "/v1/chat/completions", json=chat(model="tiny2"))
    assert r.status_code == 200
    assert "epoch 2" in cluster.log()


class _CurveServer:
    """What the fakes take as `keys`: serve CURVE with one server keypair, vetted for one ZAP domain."""

    def __init__(self, pair: tuple[bytes, bytes], domain: str) -> None:
        self.pair, self.domain = pair, domain

    def serve(self, sock: Any) -> None:
        curve.serve(sock, self.pair, self.domain)


def test_curve_keys_encrypt_every_proxy_socket(tmp_path: Path) -> None:
    """With --curve-dir the proxy is a CURVE client of the head (DEALER + SUB) and of replicas, with its
    proxy key (which the replicas' ZAP domain admits)."""
    import zmq

    keys = tmp_path / "keys"
    keyring.ensure_single_host(keys, None)
    ctx = zmq.Context()
    auth = ZapHandler(ctx, keyring.Registry(keys), lambda *a: None).start()
    replica = FakeReplica("rc", ctx=ctx, keys=_CurveServer(keyring.server_pair(keys, "replica"),
                                                           authz.REPLICA_DATA)).start_and_wait()
    head = FakeHead(ctx=ctx, keys=_CurveServer(keyring.server_pair(keys, "head"), authz.CONTROL)).start_and_wait()
    try:
        head.set_deployments([DeploymentRoute("secure", "fake", "m", [replica.route()])])
        port = free_port()
        proc = start_proxy(head.control, port, tmp_path / "proxy.log", tmp_path / "metrics",
                           "--curve-dir", str(tmp_path / "keys"))
        try:
            r = httpx.post("http://127.0.0.1:%d/v1/chat/completions" % port, json=chat(model="secure"))
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == TEXT
        finally:
            stop_proxy(proc)
        assert "(CURVE client as proxy-%s)" % keyring.local_name() in (tmp_path / "proxy.log").read_text()
    finally:
        head.stop()
        replica.stop()
        auth.stop()
        ctx.destroy(linger=0)


def test_bad_curve_dir_exits_2(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "proxy", "--head", "tcp://127.0.0.1:1",
                          "--curve-dir", str(tmp_path / "missing")],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "holds 0 proxy keys" in out.stderr and "--insecure" in out.stderr
