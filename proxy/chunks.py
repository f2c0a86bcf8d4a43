"""Bytes of OpenAI responses: SSE chunks for streams and whole JSON bodies otherwise.

Pure logic; runs in proxy workers on the per-token path; owns no socket. Each formatter precomputes the
bytes around the variable part once per request, so a content chunk costs one `msgspec.json.encode` of
the delta text plus a concatenation.

Chunk shapes (OpenAI):
  chat:        data: {"id":"chatcmpl-<rid>","object":"chat.completion.chunk","created":T,"model":M,
                      "choices":[{"index":0,"delta":{"role":"assistant","content":"..."},
                                  "logprobs":null,"finish_reason":null}]}
  completion:  data: {"id":"cmpl-<rid>","object":"text_completion","created":T,"model":M,
                      "choices":[{"index":0,"text":"...","logprobs":null,"finish_reason":null}]}
  usage:       the same head with "choices":[] and "usage":{prompt_tokens,completion_tokens,total_tokens}
  error:       data: {"error":{...}}
  end:         data: [DONE]
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import msgspec

_enc = msgspec.json.encode
DONE = b"data: [DONE]\n\n"
_END = b"\n\n"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse_error(body: dict[str, Any]) -> bytes:
    return b"data: " + _enc(body) + _END


def _head(completion_id: str, obj: str, created: int, model: str) -> bytes:
    return (b'data: {"id":' + _enc(completion_id) + b',"object":' + _enc(obj) + b',"created":'
            + str(int(created)).encode() + b',"model":' + _enc(model) + b',"choices":[')


class ChatChunks:
    """SSE chunks of one chat completion stream."""

    object = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, created: int) -> None:
        self.id = "chatcmpl-" + request_id
        self._head = _head(self.id, self.object, created, model)
        self._first = self._head + b'{"index":0,"delta":{"role":"assistant","content":'
        self._next = self._head + b'{"index":0,"delta":{"content":'
        self._tail = b'},"logprobs":null,"finish_reason":null}]}' + _END

    def content(self, text: str, first: bool) -> bytes:
        return (self._first if first else self._next) + _enc(text) + self._tail

    def template(self) -> tuple[bytes, Callable[[str], bytes], bytes]:
        """(head, encode, tail) of every content chunk after the first: head + encode(text) + tail."""
        return self._next, _enc, self._tail

    def finish(self, reason: str) -> bytes:
        return self._head + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":' + _enc(reason) + b"}]}" + _END

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._head + b'],"usage":' + _enc(usage_dict(prompt_tokens, completion_tokens)) + b"}" + _END


class CompletionChunks:
    """SSE chunks of one text completion stream (`first` is accepted for symmetry and ignored)."""

    object = "text_completion"

    def __init__(self, request_id: str, model: str, created: int) -> None:
        self.id = "cmpl-" + request_id
        self._head = _head(self.id, self.object, created, model)
        self._text = self._head + b'{"index":0,"text":'
        self._tail = b',"logprobs":null,"finish_reason":null}]}' + _END

    def content(self, text: str, first: bool) -> bytes:
        return self._text + _enc(text) + self._tail

    def template(self) -> tuple[bytes, Callable[[str], bytes], bytes]:
        """(head, encode, tail) of every content chunk: head + encode(text) + tail."""
        return self._text, _enc, self._tail

    def finish(self, reason: str) -> bytes:
        return self._text + b'"","logprobs":null,"finish_reason":' + _enc(reason) + b"}]}" + _END

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._head + b'],"usage":' + _enc(usage_dict(prompt_tokens, completion_tokens)) + b"}" + _END


def chat_completion_body(request_id: str, model: str, created: int, text: str,
                         finish_reason: Optional[str], prompt_tokens: int, completion_tokens: int) -> bytes:
    return _enc({
        "id": "chatcmpl-" + request_id, "object": "chat.completion", "created": int(created), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_dict(prompt_tokens, completion_tokens),
    })


def text_completion_body(request_id: str, model: str, created: int, text: str,
                         finish_reason: Optional[str], prompt_tokens: int, completion_tokens: int) -> bytes:
    return _enc({
        "id": "cmpl-" + request_id, "object": "text_completion", "created": int(created), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_dict(prompt_tokens, completion_tokens),
    })
