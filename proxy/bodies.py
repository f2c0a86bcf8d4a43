"""WSGI response bodies that stream a replica's deltas to the client.

Runs in proxy workers, on the request's greenlet; owns no socket (sends go through the Dispatch's
RequestStream connection). The server iterates the body and always calls `close()` — at the end, on an
error, or when the client went away (the next write fails). `close()` unregisters the request and, if the
replica has not finished it, sends Abort: a dropped client must stop generation. Must never raise out of
`__iter__` once headers are sent: failures become an SSE error event (or a plain `[error]` line) and a
clean end.

Headers may go out before the first token (SSE only): then the body first sends `: keep-alive` comments
every `keepalive` seconds while the Dispatch keeps waiting (and retrying) for the first token.

Replica lost mid-stream: the body hands the error to `Dispatch.resume` instead of the client when the
request may go on elsewhere, then waits for the new replica's first token (keep-alives meanwhile) and
carries on; the client sees one stream.

Slow readers: every write takes whatever the replica sent meanwhile, up to `max_chunk` characters, as
one chunk, so a client that reads slowly gets fewer, larger chunks; one that falls further behind than
the stream's bound is cut off by the replica connection (see replicas.py) and gets an error event.

Direct writes (gunicorn, HTTP/1.1, `ProxyConfig.direct_writes`): after the first batch has gone out with
the headers, the body parks with a `client_sink.ClientSink` attached to its stream, and the replica reader
writes the following tokens straight to the client; the body wakes for the final token, an error, the
idle timeout, a partial write (it sends the rest, then coalesces as above) or a client that is gone.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Optional, Union

from proxy import metrics
from proxy.chunks import DONE, ChatChunks, CompletionChunks, sse_error
from proxy.client_sink import ClientSink
from proxy.dispatch import Dispatch
from proxy.errors import ClientGone, ProxyError, UpstreamError
from proxy.metrics import RequestTracker
from proxy.replicas import SLOW_READER_STATUS
from proxy.streams import Item, RequestStream, as_error, is_terminal
from runtime.protocol import Delta, RequestError

log = logging.getLogger(__name__)

Chunks = Union[ChatChunks, CompletionChunks]
KEEPALIVE = b": keep-alive\n\n"
CLIENT_CHECK = 0.25  # seconds between looks at the client's socket while no write would notice it gone
ABORT_REASONS = {499: "client_gone", 504: "timeout", SLOW_READER_STATUS: "slow_reader"}  # by final status


@dataclass(frozen=True)
class BodyLimits:
    idle: float  # longest silence between two events mid-stream
    keepalive: float = 1.5  # seconds between keep-alive comments before the first token
    max_chunk: int = 65536  # characters of text coalesced into one write


def _error_item(request_id: str, exc: ProxyError) -> RequestError:
    return RequestError(request_id, exc.status, exc.message, exc.type, exc.param)


class _StreamBody:
    def __init__(self, dispatch: Dispatch, first: Optional[Delta], limits: BodyLimits,
                 tracker: RequestTracker, clock: Callable[[], float] = time.monotonic,
                 sink: Optional[ClientSink] = None) -> None:
        self._dispatch = dispatch
        self._sink = sink
        self._first = first
        self._limits = limits
        self._tracker = tracker
        self._clock = clock
        self._status = 499  # nginx's "client closed request" until we know better
        self._gen: Optional[Generator[bytes, None, None]] = None
        self._checked_at = clock()  # last look at the client's socket (bodies without a sink)

    def __iter__(self) -> Iterator[bytes]:
        self._gen = self._render()
        return self._gen

    def _batches(self) -> Iterator[Union[bytes, list[Item]]]:
        """KEEPALIVE while waiting for the first token, then lists of items (the last one terminal). Ends
        early, with no terminal item, when a direct write found the client gone. A replica lost mid-way
        (Dispatch.resumable) is replaced without a word to the client: the items it sent go out, the
        request resumes elsewhere, and the new replica's tokens follow (KEEPALIVE while it starts)."""
        d = self._dispatch
        first: Optional[Item] = self._first
        while first is None:
            yield KEEPALIVE
            first = self._first_item()
        while True:
            stream = d.stream
            assert stream is not None
            batch = [first]
            lost: Optional[RequestError] = None
            while True:
                if not is_terminal(batch[-1]):
                    batch += stream.drain(self._limits.max_chunk)
                err = as_error(batch[-1])
                if err is not None and batch[-1] is not first and d.resumable(err):
                    lost = err
                    break
                yield batch
                if is_terminal(batch[-1]):
                    return
                item = self._next(stream)
                if item is None:
                    return
                batch = [item]
                first = None  # from here on every item came from the stream
            if len(batch) > 1:
                yield batch[:-1]
            failed = d.resume(lost)
            if failed is not None:
                yield [failed]
                return
            first = None
            while first is None:
                first = self._first_item()
                if first is None:
                    yield KEEPALIVE
            if isinstance(first, RequestError):
                yield [first]
                return

    def _first_item(self) -> Optional[Item]:
        """Dispatch.first for one keep-alive interval; a final failure as an error item."""
        d = self._dispatch
        try:
            return d.first(self._limits.keepalive)
        except ProxyError as exc:
            return _error_item(d.request_id, exc)

    def _next(self, stream: RequestStream) -> Optional[Item]:
        """The next queued item, or a 504 error after `idle` seconds without a token or at the request's
        deadline; None when the client is gone. While this waits with nothing queued, the sink (if any)
        writes tokens straight to the client; each of those counts as activity."""
        d = self._dispatch
        sink = self._sink
        since = self._clock()  # the idle clock starts at the last token we know of
        if sink is None and since - self._checked_at >= CLIENT_CHECK:
            self._checked_at = since  # tokens keep coming, but nobody may be there to take them
            if d.client_gone():
                log.info("req=%s client gone; ending the request", d.request_id)
                return None
        while True:
            if sink is not None and not stream.queued:
                stream.sink = sink
            now = self._clock()
            left = d.deadline - now
            idle_left = self._limits.idle - (now - since)
            wait = max(0.0, min(idle_left, left))
            if sink is None:  # nothing writes to the client while we wait: look at its socket now and then
                wait = min(wait, CLIENT_CHECK)
            try:
                item = stream.get(wait)
            finally:  # also when the wait is interrupted (worker shutdown): never leave the sink attached
                stream.sink = None  # from here until the next wait, only this greenlet writes to the client
            if sink is not None:
                since = max(since, sink.last_at)
                if sink.unsent:  # the rest of a partial direct write goes out before anything else does,
                    sink.flush()  # also when an item queued behind it (the reader handles batches in a row)
                if sink.error is not None:
                    log.info("req=%s client gone (%s); ending the stream", d.request_id, sink.error)
                    return None
            if item is not None:
                return item
            if sink is None and d.client_gone():
                log.info("req=%s client gone while waiting for tokens; ending the request", d.request_id)
                return None
            now = self._clock()
            if now >= d.deadline:
                return RequestError(d.request_id, 504, "request took longer than %gs in all" % d.limits.total,
                                    "server_error")
            if now - since >= self._limits.idle:
                return RequestError(d.request_id, 504, "no token from replica %s for %gs"
                                    % (stream.replica_id, self._limits.idle), "server_error")

    def _failed(self, err: RequestError) -> None:
        self._status = err.status
        replica = self._dispatch.stream.replica_id if self._dispatch.stream else "-"
        log.warning("req=%s failed mid-stream on replica %s: %d %s", self._dispatch.request_id, replica,
                    err.status, err.message)

    def _render(self) -> Generator[bytes, None, None]:
        raise NotImplementedError

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
        stream = self._dispatch.stream
        if stream is not None:
            stream.sink = None  # the response is over: nothing may reach this connection any more
            if not stream.closed and not stream.finished:
                log.info("req=%s stream closed before the replica finished (client gone?)", stream.request_id)
        self._dispatch.close(ABORT_REASONS.get(self._status, "error"))
        if self._sink is not None and self._sink.chunks:
            metrics.DIRECT_CHUNKS.labels(self._tracker.deployment).inc(self._sink.chunks)
        self._tracker.finish(self._status)


def _split(batch: list[Item]) -> tuple[str, Optional[Delta], Optional[RequestError]]:
    """(text of all deltas, the finishing delta if any, the error if any) of one batch."""
    texts: list[str] = []
    last: Optional[Delta] = None
    for item in batch:
        err = as_error(item)
        if err is not None:
            return "".join(texts), None, err
        assert isinstance(item, Delta)
        texts.append(item.text)
        last = item
    return "".join(texts), (last if last is not None and last.finish_reason is not None else None), None


def _count_tokens(tracker: RequestTracker, batch: list[Item]) -> None:
    """One TTFT / inter-token observation per delta, as if each had been its own chunk (coalesced ones
    reached the client together, so their gaps are ~0: what the client saw)."""
    for item in batch:
        if isinstance(item, Delta) and item.finish_reason != "abort":
            tracker.token()


class SseBody(_StreamBody):
    """OpenAI server-sent events for chat or text completions."""

    def __init__(self, dispatch: Dispatch, first: Optional[Delta], limits: BodyLimits,
                 tracker: RequestTracker, chunks: Chunks, include_usage: bool,
                 environ: Optional[dict[str, Any]] = None) -> None:
        sink = None if environ is None else ClientSink.for_environ(environ, chunks.template(), tracker)
        super().__init__(dispatch, first, limits, tracker, sink=sink)
        self._chunks = chunks
        self._include_usage = include_usage

    def _render(self) -> Generator[bytes, None, None]:
        chunks = self._chunks
        first = True
        for batch in self._batches():
            if isinstance(batch, bytes):
                yield batch
                continue
            text, last, err = _split(batch)
            _count_tokens(self._tracker, batch)
            out = b""
            if text or (first and err is None):
                out = chunks.content(text, first)
                first = False
            if err is not None:
                self._failed(err)
                yield out + sse_error(UpstreamError.from_message(err).body()) + DONE
                return
            if last is not None:
                out += chunks.finish(last.finish_reason or "stop")
                if self._include_usage:
                    out += chunks.usage(last.prompt_tokens, last.completion_tokens)
                self._status = 200
                yield out + DONE
                return
            if out:
                yield out


PLAIN_TEMPLATE = (b"", str.encode, b"")  # the legacy stream's chunks are the text itself


class PlainBody(_StreamBody):
    """The legacy plain-text stream: one body chunk per batch, `\\n[error] ...\\n` on failure."""

    keepalive = False  # plain streams send headers only with the first token

    def __init__(self, dispatch: Dispatch, first: Optional[Delta], limits: BodyLimits,
                 tracker: RequestTracker, environ: Optional[dict[str, Any]] = None) -> None:
        sink = ClientSink.for_environ(environ, PLAIN_TEMPLATE, tracker) if environ is not None else None
        super().__init__(dispatch, first, limits, tracker, sink=sink)

    def _render(self) -> Generator[bytes, None, None]:
        first = True
        for batch in self._batches():
            if isinstance(batch, bytes):
                if self.keepalive:
                    yield batch
                continue
            text, last, err = _split(batch)
            _count_tokens(self._tracker, batch)
            if err is not None:
                self._failed(err)
                yield text.encode() + self._error_bytes(err)
                return
            if text or first:  # the first write sends the headers, even with no text: a sink may follow
                first = False
                yield text.encode()
            if last is not None:
                self._status = 200
                return

    def _error_bytes(self, err: RequestError) -> bytes:
        return ("\n[error] %s\n" % err.message).encode()


class RelayBody(PlainBody):
    """A relayed OpenAI stream: the replica's serving layer (vLLM's) wrote the SSE events, and they go
    out as they are, directly or coalesced like any text. A failure on our side (replica lost, timeout)
    ends the stream with an SSE error event and [DONE], as a vLLM server ends a failed stream."""

    keepalive = True

    def _error_bytes(self, err: RequestError) -> bytes:
        return sse_error(UpstreamError.from_message(err).body()) + DONE


def collect(dispatch: Dispatch, first: Delta, limits: BodyLimits, tracker: RequestTracker,
            clock: Callable[[], float] = time.monotonic) -> tuple[str, Delta]:
    """Gather a whole response for stream=false; raises UpstreamError on failure, ClientGone when the
    client left meanwhile (the caller's Dispatch.close then aborts the request at the replica)."""
    body = _StreamBody(dispatch, first, limits, tracker, clock)
    parts: list[str] = []
    for batch in body._batches():
        if isinstance(batch, bytes):
            continue  # a keep-alive while a resumed request waits for its new replica
        text, last, err = _split(batch)
        _count_tokens(tracker, batch)
        parts.append(text)
        if err is not None:
            raise UpstreamError.from_message(err)
        if last is not None:
            return "".join(parts), last
    raise ClientGone()
