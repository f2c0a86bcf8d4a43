"""A minimal streaming HTTP/1.1 client: one keep-alive connection, one request at a time.

Runs in the load generator's event loop; each `Connection` is owned by one client task and owns one TCP
socket (asyncio streams from `asyncio.open_connection`). It must stay cheap on the per-read path, so
it never parses chunk JSON beyond wire.StreamAccount's byte searches and never builds request bytes per
request (they are prebuilt once per run by `build_request`).

Failure kinds recorded for a request:
  connect     connecting failed, or the connection broke before a response head arrived
  http_<N>    the response status N was not 200
  truncated   the stream ended without [DONE], carried an error event, or broke the HTTP framing
  timeout     the whole request took longer than the timeout
"""
from __future__ import annotations

import asyncio
import json
import time
from array import array
from typing import Any, Optional

from benchmarks.stats import RequestRecord
from benchmarks.wire import ChunkedDecoder, ProtocolError, StreamAccount

_READ = 1 << 16


def build_request(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    """The complete bytes of a POST with a JSON body (sent unchanged by every request of a run)."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: tokenrelay-loadgen\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: %d\r\n\r\n"
            % (path, host, port, len(payload)))
    return head.encode() + payload


def parse_head(head: bytes) -> tuple[int, bool, Optional[int], bool]:
    """(status, chunked, content_length, close) from a response head ending in a blank line."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ProtocolError("bad status line %r" % lines[0][:60])
    status = int(parts[1])
    chunked, length, close = False, None, parts[0] == b"HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"content-length":
            length = int(value.strip())
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    return status, chunked, length, close


class Connection:
    """One client's keep-alive connection; reopened lazily after the server or a failure closed it."""

    __slots__ = ("host", "port", "reader", "writer")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def stream(self, request: bytes, timeout: float) -> tuple[RequestRecord, array]:
        """Send `request`, consume the whole response, and return its record and inter-token gaps."""
        start = time.perf_counter()
        acc = StreamAccount()
        rec = RequestRecord(start=start, end=start)
        try:
            if hasattr(asyncio, "timeout"):
                async with asyncio.timeout(timeout):
                    await self._exchange(request, rec, acc)
            else:  # Python 3.10
                await asyncio.wait_for(self._exchange(request, rec, acc), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            rec.failure = "timeout"
            self.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError, ValueError):
            rec.failure = "connect" if rec.status == 0 else "truncated"
            self.close()
        end = time.perf_counter()
        rec.end = acc.t_done if acc.t_done is not None else end
        if acc.t_first is not None:
            rec.ttft = acc.t_first - start
        rec.events = acc.events
        rec.tokens = acc.tokens
        if rec.failure is None and rec.status == 200 and not acc.complete:
            rec.failure = "truncated"
        return rec, acc.gaps

    async def _exchange(self, request: bytes, rec: RequestRecord, acc: StreamAccount) -> None:
        reused = self.writer is not None
        if not reused:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)  # type: ignore[union-attr]
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")  # type: ignore[union-attr]
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused:
                raise
            # The server closed an idle keep-alive connection: retry once on a fresh one, as clients do.
            self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
        status, chunked, length, close = parse_head(head)
        rec.status = status
        if status != 200:
            rec.failure = "http_%d" % status
        sink = acc if status == 200 else None
        if chunked:
            eof = await self._read_chunked(sink)
        elif length is not None:
            eof = await self._read_length(length, sink)
        else:
            eof = await self._read_to_eof(sink)
        if eof or close:
            self.close()

    async def _read_chunked(self, acc: Optional[StreamAccount]) -> bool:
        reader, dec = self.reader, ChunkedDecoder()
        while not dec.done:
            data = await reader.read(_READ)  # type: ignore[union-attr]
            if not data:
                return True  # EOF before the last chunk: [DONE] may still have been seen
            payload = dec.feed(data)
            if payload and acc is not None:
                acc.feed(payload, time.perf_counter())
        return bool(dec.tail)  # bytes after the body: the framing is off, do not reuse

    async def _read_length(self, length: int, acc: Optional[StreamAccount]) -> bool:
        reader = self.reader
        while length > 0:
            data = await reader.read(min(length, _READ))  # type: ignore[union-attr]
            if not data:
                return True
            length -= len(data)
            if acc is not None:
                acc.feed(data, time.perf_counter())
        return False

    async def _read_to_eof(self, acc: Optional[StreamAccount]) -> bool:
        while True:
            data = await self.reader.read(_READ)  # type: ignore[union-attr]
            if not data:
                return True
            if acc is not None:
                acc.feed(data, time.perf_counter())
