"""OpenAI API parity for image content parts: `vllm serve` and tokenrelay on a tiny multimodal model.

Starts each server once for the module on a random-weight Idefics3 built offline (tests/tiny_model.py
`build_tiny_idefics3`; 56 px images, 4 tokens each), both with the same options (served name `tiny`,
max_model_len 512, at most 2 images per prompt; bf16 and eager mode passed to vLLM explicitly as in
test_conformance.py). Every row of TABLE goes to both, non-streamed and streamed, and the answers must
match field by field (test_conformance.py's `answer` and `diff`). Images are PNGs made here, sent as
`data:image/png;base64,...` URLs, and once as an `http://127.0.0.1` URL that the servers fetch
from a server in the test (no other network). The tiny model's greedy text hardly depends on its input,
so the rows ask for logprobs too: those change with every pixel, and one test checks that they do.
"""
from __future__ import annotations

import base64
import io
import json
import os
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.vllm.harness import skip_without_vllm

skip_without_vllm()

from tests.vllm.test_conformance import (  # noqa: E402
    CHAT, GREEDY, MODEL, answer, diff, normalize, relay_stack, summary, vllm_server,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

OPTIONS = {"max_model_len": 512, "limit_mm_per_prompt": {"image": 2}}
VLLM_FLAGS = ["--served-model-name", MODEL, "--max-model-len", "512", "--limit-mm-per-prompt",
              json.dumps({"image": 2}), "--dtype", "bfloat16", "--enforce-eager"]
PROXY_MAX_BODY = 16 * 1024 * 1024  # the proxy's default --max-body-bytes


def png(color: tuple[int, int, int], size: tuple[int, int] = (24, 16), noise: bool = False) -> bytes:
    """A PNG of one colour, or of random pixels (which do not compress: its size is about w*h*3 bytes)."""
    from PIL import Image

    image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else \
        Image.new("RGB", size, color)
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def image(data: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def chat(*content: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": list(content)}], "max_tokens": 3,
            "logprobs": True, "top_logprobs": 2, **GREEDY, **extra}


RED, BLUE, GREEN = image(png((200, 30, 30))), image(png((30, 30, 200))), image(png((30, 200, 30), (10, 40)))
TEXT = {"type": "text", "text": "What is in this picture?"}
# (name, body): every row is sent as is and again with "stream": true
TABLE: list[tuple[str, dict[str, Any]]] = [
    ("one image", chat(RED)),
    ("text and image", chat(TEXT, BLUE)),
    ("two images", chat(RED, {"type": "text", "text": "and"}, GREEN)),
    ("image in an earlier turn", {**chat(TEXT, RED), "messages": [
        {"role": "user", "content": [TEXT, RED]}, {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And its colour?"}]}),
    ("three images, over the limit of 2", chat(RED, BLUE, GREEN)),
    ("malformed data URL", chat({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!not64"}})),
    ("not an image", chat({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}})),
]


def cases() -> list[tuple[str, dict[str, Any]]]:
    return [c for name, body in TABLE for c in ((name, body), (name + " (stream)", {**body, "stream": True}))]


@pytest.fixture(scope="module")
def mm_model(vllm_env: Path) -> Path:
    from tests.tiny_model import build_tiny_idefics3

    return build_tiny_idefics3(vllm_env / "tiny-idefics3")


@pytest.fixture(scope="module")
def vllm_serve(vllm_env: Path, mm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with vllm_server(mm_model, VLLM_FLAGS, tmp_path_factory.mktemp("vllm-serve-images")) as base:
        yield base


@pytest.fixture(scope="module")
def relay(vllm_serve: str, mm_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with relay_stack(mm_model, OPTIONS, tmp_path_factory.mktemp("relay-stack-images")) as stack:
        yield stack.base_url


@pytest.mark.parametrize("name,body", cases(), ids=[c[0] for c in cases()])
def test_same_answer(vllm_serve: str, relay: str, name: str, body: dict[str, Any]) -> None:
    expected = answer(vllm_serve, CHAT, body)
    got = answer(relay, CHAT, body)
    print("\n%-44s %d %s" % (name, got["status"], summary(got)))  # the conformance table, with -s
    assert diff(expected, got) is None, "%s: %s\nvllm: %s\ntokenrelay: %s" % (
        name, diff(expected, got), json.dumps(expected)[:2000], json.dumps(got)[:2000])
    if "over the limit" in name or "malformed" in name or "not an image" in name:
        assert got["status"] == 400, got


@pytest.fixture(scope="module")
def image_url() -> Iterator[str]:
    """An `http://127.0.0.1:PORT/red.png` that a thread of the test serves (a PNG of one colour)."""
    data = png((200, 30, 30))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "http://127.0.0.1:%d/red.png" % server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_http_image_url_gives_the_same_answer(vllm_serve: str, relay: str, image_url: str,
                                                 stream: bool) -> None:
    """The replica fetches an http(s) image itself, as `vllm serve` does: same answer as the same PNG
    given inline."""
    body = chat(TEXT, {"type": "image_url", "image_url": {"url": image_url}}, stream=stream)
    expected, got = answer(vllm_serve, CHAT, body), answer(relay, CHAT, body)
    assert expected["status"] == 200 and diff(expected, got) is None, diff(expected, got)
    inline = answer(relay, CHAT, chat(TEXT, RED, stream=stream))
    assert diff(inline, got) is None, diff(inline, got)


def test_the_official_client_gets_the_same(vllm_serve: str, relay: str) -> None:
    """An image through the `openai` client: the parsed objects match."""
    openai = pytest.importorskip("openai")

    def call(base: str) -> Any:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        return normalize(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [TEXT, BLUE]}], max_tokens=3, temperature=0,
            logprobs=True, top_logprobs=2).model_dump())

    expected, got = call(vllm_serve), call(relay)
    assert expected["choices"][0]["logprobs"], expected
    assert diff(expected, got) is None, diff(expected, got)


def test_the_image_reaches_the_model(relay: str) -> None:
    """Without this the rows above could pass with the images dropped on both sides."""
    def logprobs(part: dict[str, Any]) -> Any:
        got = answer(relay, CHAT, chat(part))
        assert got["status"] == 200, got
        return got["body"]["choices"][0]["logprobs"]

    assert logprobs(RED) != logprobs(BLUE)


def test_a_large_image_within_the_proxy_limit_is_relayed(vllm_serve: str, relay: str) -> None:
    """An image body of ~11 MiB (an 8 MiB PNG of noise, base64) passes the proxy's 16 MiB body limit."""
    body = chat(image(png((0, 0, 0), (1700, 1700), noise=True)), max_tokens=1)
    assert 10 * 1024 * 1024 < len(json.dumps(body)) < PROXY_MAX_BODY
    expected, got = answer(vllm_serve, CHAT, body), answer(relay, CHAT, body)
    assert expected["status"] == 200 and diff(expected, got) is None, diff(expected, got)


def test_a_body_over_the_proxy_limit_is_a_413_json_error(vllm_serve: str, relay: str) -> None:
    """Above --max-body-bytes (16 MiB by default, docs/api.md) the proxy refuses what `vllm serve`, which
    has no body limit, would take: a 413 with an OpenAI-style error naming the limit, not a reset."""
    body = chat(image(png((0, 0, 0), (2400, 2400), noise=True)), max_tokens=1)
    assert len(json.dumps(body)) > PROXY_MAX_BODY
    assert answer(vllm_serve, CHAT, body)["status"] == 200
    status, answer_body, sent, ended_after = post_reading_early(relay + CHAT, json.dumps(body).encode())
    assert status == 413, answer_body[:500]
    error = json.loads(answer_body)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "body_too_large"), error
    assert sent < PROXY_MAX_BODY  # refused from Content-Length: the body was not read to its end
    assert ended_after < 10.0  # ... and the proxy ended the connection instead of holding it open


def post_reading_early(url: str, body: bytes, give_up: float = 30.0) -> tuple[int, bytes, int, float]:
    """POST `body` on a raw socket, reading whatever the server answers while still sending (as browsers
    and careful clients do; httpx reads only once the body is out). Returns (status, response body,
    bytes of the body sent, seconds until the server ended the connection)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    sock = socket.create_connection((host, int(port)), timeout=give_up)
    sock.setblocking(False)
    head = ("POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path, host, len(body))).encode()
    out, got, sent, start = head + body, b"", 0, time.monotonic()
    sending = True
    try:
        while time.monotonic() - start < give_up:
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 0.5)
            if writable:
                try:
                    sent += sock.send(out[sent:sent + 65536])
                    sending = sent < len(out)
                except (BrokenPipeError, ConnectionResetError):
                    sending = False  # the server stopped taking the body: read what it answered
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    break
                got += data
    finally:
        sock.close()
    ended_after = time.monotonic() - start
    header, _, rest = got.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1]) if header.startswith(b"HTTP/") else 0
    return status, rest, max(0, sent - len(head)), ended_after
