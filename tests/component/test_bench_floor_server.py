"""The benchmark floor (benchmarks/floor_server.py) over real sockets, read by the load generator's own
client: the timing it promises (first token after TTFT, then one per ITL), complete OpenAI streams that
the client accepts, usage, errors, and a client that hangs up does not break the server."""
from __future__ import annotations

import asyncio
import json

from benchmarks.floor_server import FloorServer
from benchmarks.http_client import Connection, build_request


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def _server(**kwargs) -> FloorServer:
    server = FloorServer(ttft_ms=kwargs.pop("ttft_ms", 40.0), itl_ms=kwargs.pop("itl_ms", 10.0), **kwargs)
    await server.start()
    return server


def test_stream_timing_and_content():
    async def main():
        server = await _server(tokens=8, schedule="relative")  # each gap >= ITL (absolute: see below)
        conn = Connection("127.0.0.1", server.port)
        body = {"model": "mock", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}}
        rec, gaps = await conn.stream(build_request("127.0.0.1", server.port, "/v1/completions", body), 10)
        chat, _ = await conn.stream(build_request("127.0.0.1", server.port, "/v1/chat/completions", dict(
            body, messages=[{"role": "user", "content": "hi"}], max_tokens=3)), 10)  # same keep-alive
        conn.close()
        await server.stop()
        return rec, list(gaps), chat

    rec, gaps, chat = _run(main())
    assert rec.ok and rec.status == 200 and rec.tokens == 8 and rec.events == 8
    assert rec.ttft >= 0.040
    assert len(gaps) == 7 and all(g >= 0.009 for g in gaps), gaps  # libuv/asyncio fire <= 1 ms early
    assert sorted(gaps)[3] < 0.030  # one per ITL, not bunched at the end
    assert chat.ok and chat.tokens == 3


def test_absolute_schedule_keeps_token_k_at_ttft_plus_k_itl():
    async def main():
        server = await _server(ttft_ms=20.0, itl_ms=15.0, tokens=6, schedule="absolute")
        conn = Connection("127.0.0.1", server.port)
        rec, _ = await conn.stream(build_request("127.0.0.1", server.port, "/v1/completions",
                                                 {"model": "mock", "prompt": "x", "stream": True}), 10)
        conn.close()
        await server.stop()
        return rec

    rec = _run(main())
    assert rec.ok and rec.events == 6
    assert 0.020 + 5 * 0.015 - 0.002 <= rec.end - rec.start < 0.020 + 5 * 0.015 + 0.050


def test_errors_and_a_client_that_hangs_up():
    async def main():
        server = await _server(ttft_ms=5.0, itl_ms=50.0, tokens=100)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(build_request("127.0.0.1", server.port, "/v1/completions",
                                   {"model": "mock", "prompt": "x", "stream": True}))
        await reader.readuntil(b"data: ")  # the first token is out
        writer.close()  # hang up mid-stream: the server's timers must stop, not raise
        conn = Connection("127.0.0.1", server.port)
        bad, _ = await conn.stream(build_request("127.0.0.1", server.port, "/v1/completions",
                                                 {"model": "mock", "max_tokens": 0, "stream": True}), 10)
        ok, _ = await conn.stream(build_request("127.0.0.1", server.port, "/v1/completions",
                                                {"model": "mock", "max_tokens": 2, "stream": True}), 10)
        conn.close()
        await asyncio.sleep(0.15)  # two ITLs of the abandoned stream pass while the loop runs
        await server.stop()
        return bad, ok

    loop_errors = []
    bad, ok = asyncio.run(_with_handler(main(), loop_errors))
    assert bad.status == 400 and bad.failure == "http_400"
    assert ok.status == 200 and ok.failure is None
    assert loop_errors == []


async def _with_handler(coro, errors):
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    return await asyncio.wait_for(coro, 20)


def test_non_streamed_body_is_one_json_document():
    async def main():
        server = await _server(ttft_ms=1.0, itl_ms=1.0, tokens=4)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = {"model": "mock", "prompt": "x"}
        writer.write(build_request("127.0.0.1", server.port, "/v1/completions", body))
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(length))
        writer.close()
        await server.stop()
        return body

    body = _run(main())
    assert body["choices"][0]["text"].count(" ") == 4 and body["usage"]["completion_tokens"] == 4
