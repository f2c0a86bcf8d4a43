"""The floor: an OpenAI-compatible streaming server with the mock engine's timing and no proxy in between.

Runs as its own process (`python benchmarks/floor_server.py`) or inside the load generator's self-test
(`FloorServer` in a thread's event loop). Owns one listening TCP socket and the connections accepted on
it, all on one asyncio loop (uvloop when importable). Pointed at by the load generator, it measures what
a client sees when the only work between it and the "engine" is one HTTP server; anything tokenrelay
adds on top is the proxy's cost. It must never block its loop, and it is not a model: text is a fixed
word list.

Timing per stream: first content chunk after TTFT, then one chunk every ITL, `max_tokens` (else
`--tokens`) chunks, the last together with the finish chunk, the optional usage chunk and [DONE].
`--schedule absolute` (default) keeps token k at TTFT + k*ITL after the request arrived, whatever the
loop lag: an exact timer, so the floor is what a fixed-rate engine would give, not a copy of any drift.
`relative` waits ITL after each token (a timer that drifts by the loop's lag on every token).

Routes: POST /v1/completions, POST /v1/chat/completions (streamed or not), GET /v1/models, /ready, /health.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("floor")

WORDS = ("the quick brown fox jumps over a lazy dog while tokens stream through "
         "relay replicas to many patient clients under steady load").split()
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_response(status: int, body: Any, close: bool = False) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (status, _REASONS.get(status, "Error").encode(), len(payload),
               b"Connection: close\r\n" if close else b"") + payload)


def _error(status: int, message: str) -> bytes:
    return _json_response(status, {"error": {"message": message, "type": "invalid_request_error",
                                             "param": None, "code": None}})


class FloorServer:
    """The floor's HTTP server. `start()` binds (port 0 picks a free port, read back from `port`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ttft_ms: float = 20.0, itl_ms: float = 10.0,
                 tokens: int = 64, model: str = "mock", schedule: str = "absolute") -> None:
        if schedule not in ("relative", "absolute"):
            raise ValueError("--schedule: must be relative or absolute, got %r" % schedule)
        self.host = host
        self.port = port
        self.ttft = ttft_ms / 1000.0
        self.itl = itl_ms / 1000.0
        self.tokens = tokens
        self.model = model
        self.absolute = schedule == "absolute"
        self._ids = itertools.count(1)
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.split(b"\r\n")
                method, path = (lines[0].split(b" ") + [b"", b""])[:2]
                length, close = 0, False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value.strip())
                    elif name == b"connection":
                        close = value.strip().lower() == b"close"
                body = await reader.readexactly(length) if length else b""
                if not await self._dispatch(method, path.decode("latin-1"), body, writer) or close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _dispatch(self, method: bytes, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        path = path.split("?", 1)[0]
        if method == b"GET" and path in ("/ready", "/health"):
            writer.write(_json_response(200, {"status": "ok"}))
        elif method == b"GET" and path == "/v1/models":
            writer.write(_json_response(200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "floor"}]}))
        elif path in ("/v1/completions", "/v1/chat/completions"):
            if method != b"POST":
                writer.write(_error(405, "use POST"))
                return True
            try:
                request = json.loads(body)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError:
                writer.write(_error(400, "the body is not a JSON object"))
                return True
            return await self._generate(request, path == "/v1/chat/completions", writer)
        else:
            writer.write(_error(404, "no route %s %s" % (method.decode("latin-1"), path)))
        return True

    async def _generate(self, request: dict[str, Any], chat: bool, writer: asyncio.StreamWriter) -> bool:
        max_tokens = request.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            writer.write(_error(400, "max_tokens must be a positive integer"))
            return True
        rid = next(self._ids)
        kind = "chat.completion" if chat else "text_completion"
        words = [WORDS[(rid + i) % len(WORDS)] + " " for i in range(max_tokens)]
        if not request.get("stream"):
            await asyncio.sleep(self.ttft + self.itl * (max_tokens - 1))
            text = "".join(words)
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text}}
                                      if chat else {"index": 0, "text": text})
            choice.update(logprobs=None, finish_reason="length")
            writer.write(_json_response(200, {
                "id": "floor-%d" % rid, "object": kind, "created": int(time.time()), "model": self.model,
                "choices": [choice], "usage": _usage(max_tokens)}))
            return True
        usage = bool((request.get("stream_options") or {}).get("include_usage"))
        head = (b'data: {"id":"floor-%d","object":"%s","created":%d,"model":%s,"choices":['
                % (rid, kind.encode() + (b".chunk" if chat else b""), int(time.time()),
                   json.dumps(self.model).encode()))
        writer.write(_SSE_HEAD)
        return await self._stream(writer, head, words, chat, usage)

    async def _stream(self, writer: asyncio.StreamWriter, head: bytes, words: list[str], chat: bool,
                      usage: bool) -> bool:
        loop = asyncio.get_running_loop()
        transport = writer.transport
        t0 = loop.time()
        delay = self.ttft
        for i, word in enumerate(words):
            if self.absolute:
                delay = max(0.0, t0 + self.ttft + i * self.itl - loop.time())
            await asyncio.sleep(delay)
            if transport.is_closing():
                return False  # the client went away: stop generating, like an abort
            delay = self.itl
            text = json.dumps(word).encode()
            if chat:
                delta = (b'{"role":"assistant","content":' if i == 0 else b'{"content":') + text + b"}"
                out = head + b'{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":null}]}\n\n'
            else:
                out = head + b'{"index":0,"text":' + text + b',"logprobs":null,"finish_reason":null}]}\n\n'
            data = _chunk(out)
            if i == len(words) - 1:
                empty = b'"delta":{}' if chat else b'"text":""'
                data += _chunk(head + b'{"index":0,' + empty
                               + b',"logprobs":null,"finish_reason":"length"}]}\n\n')
                if usage:
                    data += _chunk(head + b'],"usage":' + json.dumps(_usage(len(words))).encode() + b"}\n\n")
                data += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
            writer.write(data)
            if transport.get_write_buffer_size() > 1 << 16:
                await writer.drain()
        return True


def _usage(completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 1, "completion_tokens": completion_tokens, "total_tokens": completion_tokens + 1}


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed; True if it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def _main(ns: argparse.Namespace) -> int:
    server = FloorServer(ns.host, ns.port, ns.ttft_ms, ns.itl_ms, ns.tokens, ns.model, ns.schedule)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("floor[%d] [startup] serving on http://%s:%d ttft=%gms itl=%gms tokens=%d schedule=%s",
             server.port, ns.host, server.port, ns.ttft_ms, ns.itl_ms, ns.tokens, ns.schedule)
    await stop.wait()
    await server.stop()
    log.info("floor[%d] [shutdown] stopped", server.port)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="The no-proxy baseline: OpenAI streaming with mock timing.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=64, help="output tokens when a request sets no max_tokens")
    p.add_argument("--model", default="mock")
    p.add_argument("--schedule", choices=("relative", "absolute"), default="absolute")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    uv = install_uvloop()
    log.info("floor [startup] event loop: %s", "uvloop" if uv else "asyncio")
    return asyncio.run(_main(ns))


if __name__ == "__main__":
    sys.exit(main())
