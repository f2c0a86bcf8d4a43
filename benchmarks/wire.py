"""Pure parsing of streamed HTTP responses for the load generator: chunked transfer decoding, SSE event
classification and per-stream accounting.

Runs in the load generator's event loop on the per-read path; owns no socket and never blocks. Cost
matters more than generality: events are classified by byte search and one small regex, and only the
usage chunk is parsed as JSON. Multi-line `data:` fields (unused by OpenAI streams) are not joined.

Event kinds are bit flags, because one chunk may carry both text and a finish_reason:
  CONTENT  non-empty `choices[0].text` or `choices[0].delta.content`
  FINISH   a non-null finish_reason
  USAGE    a `usage` object (the include_usage chunk)
  ERROR    `data: {"error": ...}`
  DONE     `data: [DONE]`
"""
from __future__ import annotations

import json
import re
from array import array
from typing import Optional

CONTENT = 1
FINISH = 2
USAGE = 4
ERROR = 8
DONE = 16

# A JSON string value cannot hold an unescaped quote, so `"text":"` followed by anything but `"` means
# non-empty text; keys are matched with their quotes so text *containing* "text" never matches.
_CONTENT_RE = re.compile(rb'"(?:text|content)"\s*:\s*"(?!")')
_FINISH_RE = re.compile(rb'"finish_reason"\s*:\s*"')
_USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')


class ProtocolError(Exception):
    """The server sent bytes that are not valid HTTP/1.1 chunked framing."""


def classify(event: bytes) -> int:
    """Kinds (bit flags, 0 for comments and unknown events) of one SSE event without its blank line."""
    start = event.find(b"data:")
    if start < 0:
        return 0
    data = event[start + 5:].lstrip()
    if data.startswith(b"[DONE]"):
        return DONE
    if data.startswith(b'{"error"') or (b'"error"' in data and b'"choices"' not in data):
        return ERROR
    kinds = CONTENT if _CONTENT_RE.search(data) else 0
    if b'"finish_reason"' in data and _FINISH_RE.search(data):
        kinds |= FINISH
    if b'"usage"' in data and _USAGE_RE.search(data):
        kinds |= USAGE
    return kinds


def usage_completion_tokens(event: bytes) -> Optional[int]:
    """`usage.completion_tokens` of a USAGE event, or None if it is missing or malformed."""
    start = event.find(b"data:")
    try:
        value = json.loads(event[start + 5:])["usage"]["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_SIZE, _DATA, _DATA_CRLF, _TRAILER, _END = range(5)


class ChunkedDecoder:
    """Incremental decoder of an HTTP/1.1 chunked body. `feed` returns the payload bytes decoded so far.

    Partial chunk data is returned as soon as it arrives (a large chunk split across reads is not held
    back). Once the last chunk and trailers are read, `done` is True and extra bytes land in `tail`.
    """

    __slots__ = ("_buf", "_state", "_left", "done", "tail")

    def __init__(self) -> None:
        self._buf = b""
        self._state = _SIZE
        self._left = 0
        self.done = False
        self.tail = b""

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.tail += data
            return b""
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        out: list[bytes] = []
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._left, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _DATA_CRLF
            elif state == _DATA_CRLF:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 4096:
                        raise ProtocolError("chunk size or trailer line too long")
                    break
                line, pos = buf[pos:eol], eol + 2
                if state == _SIZE:
                    self._left = _chunk_size(line)
                    self._state = _DATA if self._left else _TRAILER
                elif not line:  # the blank line ending the trailers
                    self._state = _END
                    self.done = True
                    self.tail = buf[pos:]
                    pos = n
        self._buf = buf[pos:] if pos < n else b""
        return out[0] if len(out) == 1 else b"".join(out)


def _chunk_size(line: bytes) -> int:
    semi = line.find(b";")
    if semi >= 0:
        line = line[:semi]
    try:
        size = int(line.strip(), 16)
    except ValueError:
        raise ProtocolError("bad chunk size line %r" % line[:40]) from None
    if size < 0:
        raise ProtocolError("negative chunk size")
    return size


class StreamAccount:
    """What one streamed response has shown so far: event times, counts, and how it ended.

    `feed(payload, now)` takes decoded body bytes and the time they were read; events completed by those
    bytes all get that time (so several events in one read have 0 s gaps, exactly as the client saw them).
    """

    __slots__ = ("_buf", "t_first", "t_last", "t_done", "gaps", "events", "usage_tokens",
                 "finished", "done", "error")

    def __init__(self) -> None:
        self._buf = b""
        self.t_first: Optional[float] = None
        self.t_last = 0.0
        self.t_done: Optional[float] = None
        self.gaps = array("d")
        self.events = 0
        self.usage_tokens: Optional[int] = None
        self.finished = False
        self.done = False
        self.error = False

    def feed(self, payload: bytes, now: float) -> None:
        buf = self._buf + payload if self._buf else payload
        if b"\r" in buf:
            if buf.endswith(b"\r"):  # maybe half of a CRLF: wait for the rest before normalising
                self._buf = buf
                return
            buf = buf.replace(b"\r\n", b"\n")
        if b"\n\n" not in buf:
            self._buf = buf
            return
        events = buf.split(b"\n\n")
        self._buf = events.pop()
        for event in events:
            if event:
                self._event(event, now)

    def _event(self, event: bytes, now: float) -> None:
        kinds = classify(event)
        if not kinds:
            return
        if kinds & CONTENT:
            if self.t_first is None:
                self.t_first = now
            else:
                self.gaps.append(now - self.t_last)
            self.t_last = now
            self.events += 1
        if kinds & FINISH:
            self.finished = True
        if kinds & USAGE:
            self.usage_tokens = usage_completion_tokens(event)
        if kinds & ERROR:
            self.error = True
        if kinds & DONE:
            self.done = True
            self.t_done = now

    @property
    def tokens(self) -> int:
        """Output tokens: usage.completion_tokens when the server sent it, else the content events."""
        return self.usage_tokens if self.usage_tokens is not None else self.events

    @property
    def complete(self) -> bool:
        """The stream ended normally: [DONE] seen and no error event."""
        return self.done and not self.error
