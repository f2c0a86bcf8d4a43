"""Unit tests for proxy.chunks: SSE bytes parsed back with json and compared with OpenAI's shapes."""
from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.chunks import (
    DONE, ChatChunks, CompletionChunks, chat_completion_body, sse_error, text_completion_body,
)

TRICKY = 'He said "hi"\n\tthen left \\ 😀 </script> \u2028'


def event(raw: bytes) -> Any:
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    assert raw.count(b"\n\n") == 1, "one event per chunk"
    return json.loads(raw[len(b"data: "):-2])


def test_chat_first_chunk_carries_role() -> None:
    c = ChatChunks("w1-ab-7", "tiny", 1700000000)
    assert event(c.content("Hel", first=True)) == {
        "id": "chatcmpl-w1-ab-7", "object": "chat.completion.chunk", "created": 1700000000, "model": "tiny",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "logprobs": None,
                     "finish_reason": None}],
    }


def test_chat_later_chunks_escape_text_exactly() -> None:
    c = ChatChunks("r", "m\"odel", 1)
    got = event(c.content(TRICKY, first=False))
    assert got["choices"][0]["delta"] == {"content": TRICKY}
    assert got["model"] == 'm"odel'


def test_chat_finish_and_usage_chunks() -> None:
    c = ChatChunks("r", "tiny", 5)
    fin = event(c.finish("length"))
    assert fin["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    use = event(c.usage(3, 4))
    assert use["choices"] == [] and use["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert use["id"] == "chatcmpl-r" and use["object"] == "chat.completion.chunk"


def test_completion_chunks() -> None:
    c = CompletionChunks("r9", "tiny", 5)
    got = event(c.content(TRICKY, first=True))
    assert got == {"id": "cmpl-r9", "object": "text_completion", "created": 5, "model": "tiny",
                   "choices": [{"index": 0, "text": TRICKY, "logprobs": None, "finish_reason": None}]}
    fin = event(c.finish("stop"))
    assert fin["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]
    assert event(c.usage(1, 2))["usage"]["total_tokens"] == 3


def test_error_event_and_done() -> None:
    body = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert event(sse_error(body)) == body
    assert DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("render,obj", [(chat_completion_body, "chat.completion"),
                                        (text_completion_body, "text_completion")])
def test_whole_bodies(render: Any, obj: str) -> None:
    got = json.loads(render("r1", "tiny", 9, TRICKY, "stop", 2, 3))
    assert got["object"] == obj and got["model"] == "tiny" and got["created"] == 9
    assert got["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    choice = got["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    if obj == "chat.completion":
        assert got["id"] == "chatcmpl-r1" and choice["message"] == {"role": "assistant", "content": TRICKY}
    else:
        assert got["id"] == "cmpl-r1" and choice["text"] == TRICKY


@pytest.mark.parametrize("cls", [ChatChunks, CompletionChunks])
@pytest.mark.parametrize("text", ["", "plain", 'quote " and \\ backslash', "ünïcode ✓ \n new line"])
def test_direct_write_template_renders_the_same_bytes_as_content(cls, text) -> None:
    chunks = cls("rid-1", "m", 1700000000)
    head, encode, tail = chunks.template()
    assert head + encode(text) + tail == chunks.content(text, False)
