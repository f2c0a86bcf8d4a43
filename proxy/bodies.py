"""WSGI response bodies that stream a replica's deltas to the client.

Runs in proxy workers, on the request's greenlet; owns no socket (sends go through the RequestStream's
connection). The server iterates the body and always calls `close()` — at the end, on an error, or when
the client went away (the next write fails). `close()` unregisters the request and, if the replica has
not finished it, sends Abort: a dropped client must stop generation. Must never raise out of `__iter__`
once headers are sent: failures become an SSE error event (or a plain `[error]` line) and a clean end.
"""
from __future__ import annotations

import logging
from typing import Iterator, Optional, Union

from proxy.chunks import DONE, ChatChunks, CompletionChunks, sse_error
from proxy.errors import UpstreamError, error_body
from proxy.metrics import RequestTracker
from proxy.streams import Item, RequestStream, is_terminal
from runtime.protocol import Delta, RequestError

log = logging.getLogger(__name__)

Chunks = Union[ChatChunks, CompletionChunks]


def as_error(item: Item) -> Optional[RequestError]:
    """The failure an item stands for, if any. A replica-side abort counts as one: we never asked."""
    if isinstance(item, RequestError):
        return item
    if item.finish_reason == "abort":
        return RequestError(item.request_id, 503, "request was aborted by the replica", "server_error")
    return None


def timeout_error(stream: RequestStream, seconds: float, first: bool) -> RequestError:
    what = "first token" if first else "next token"
    return RequestError(stream.request_id, 504, "no %s from replica %s within %.0fs"
                        % (what, stream.replica_id, seconds), "server_error")


class _StreamBody:
    def __init__(self, stream: RequestStream, first: Item, idle_timeout: float,
                 tracker: RequestTracker) -> None:
        self._stream = stream
        self._first = first
        self._idle_timeout = idle_timeout
        self._tracker = tracker
        self._status = 499  # nginx's "client closed request" until we know better
        self._gen: Optional[Iterator[bytes]] = None

    def __iter__(self) -> Iterator[bytes]:
        self._gen = self._render()
        return self._gen

    def _items(self) -> Iterator[Item]:
        item = self._first
        while True:
            yield item
            if is_terminal(item):
                return
            nxt = self._stream.get(self._idle_timeout)
            item = nxt if nxt is not None else timeout_error(self._stream, self._idle_timeout, False)

    def _failed(self, err: RequestError) -> None:
        self._status = err.status
        log.warning("req=%s failed mid-stream on replica %s: %d %s", self._stream.request_id,
                    self._stream.replica_id, err.status, err.message)

    def _render(self) -> Iterator[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
        if not self._stream.closed:
            if not self._stream.finished:
                log.info("req=%s stream closed before the replica finished (client gone?)",
                         self._stream.request_id)
            self._stream.close()
        self._tracker.finish(self._status)


class SseBody(_StreamBody):
    """OpenAI server-sent events for chat or text completions."""

    def __init__(self, stream: RequestStream, first: Item, idle_timeout: float, tracker: RequestTracker,
                 chunks: Chunks, include_usage: bool) -> None:
        super().__init__(stream, first, idle_timeout, tracker)
        self._chunks = chunks
        self._include_usage = include_usage

    def _render(self) -> Iterator[bytes]:
        chunks = self._chunks
        first = True
        for item in self._items():
            err = as_error(item)
            if err is not None:
                self._failed(err)
                yield sse_error(error_body(err.message, err.type, err.param)) + DONE
                return
            assert isinstance(item, Delta)
            self._tracker.token()
            out = b""
            if item.text or first:
                out = chunks.content(item.text, first)
                first = False
            if item.finish_reason is not None:
                out += chunks.finish(item.finish_reason)
                if self._include_usage:
                    out += chunks.usage(item.prompt_tokens, item.completion_tokens)
                self._status = 200
                yield out + DONE
                return
            if out:
                yield out


class PlainBody(_StreamBody):
    """The legacy plain-text stream: one body chunk per delta, `\\n[error] ...\\n` on failure."""

    def _render(self) -> Iterator[bytes]:
        for item in self._items():
            err = as_error(item)
            if err is not None:
                self._failed(err)
                yield ("\n[error] %s\n" % err.message).encode()
                return
            assert isinstance(item, Delta)
            self._tracker.token()
            if item.text:
                yield item.text.encode()
            if item.finish_reason is not None:
                self._status = 200
                return


def collect(stream: RequestStream, first: Item, idle_timeout: float,
            tracker: RequestTracker) -> tuple[str, Delta]:
    """Gather a whole response for stream=false; raises UpstreamError on failure."""
    parts: list[str] = []
    item = first
    while True:
        err = as_error(item)
        if err is not None:
            raise UpstreamError.from_message(err)
        assert isinstance(item, Delta)
        tracker.token()
        parts.append(item.text)
        if item.finish_reason is not None:
            return "".join(parts), item
        nxt = stream.get(idle_timeout)
        item = nxt if nxt is not None else timeout_error(stream, idle_timeout, False)
