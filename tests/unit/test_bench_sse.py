"""Pure parts of the benchmark load generator: chunked decoding, SSE classification, accounting, stats."""
import json
import math

import pytest

from benchmarks.http_client import build_request, parse_head
from benchmarks.stats import RequestRecord, distribution_ms, format_summary, percentile, summarize
from benchmarks.wire import (
    CONTENT, DONE, ERROR, FINISH, USAGE, ChunkedDecoder, ProtocolError, StreamAccount, classify,
    usage_completion_tokens,
)

HEAD = b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"mock","choices":['
TEXT = HEAD + b'{"index":0,"text":"hello ","logprobs":null,"finish_reason":null}]}'
EMPTY_FINISH = HEAD + b'{"index":0,"text":"","logprobs":null,"finish_reason":"length"}]}'
CHAT_ROLE = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,'
             b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}')
CHAT_TEXT = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,'
             b'"delta":{"content":"hi"},"finish_reason":null}]}')
CHAT_FINISH = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,'
               b'"delta":{},"finish_reason":"stop"}]}')
USAGE_EV = HEAD + b'],"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}'
ERROR_EV = b'data: {"error":{"message":"replica died","type":"server_error","code":503}}'


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


# --------------------------------------------------------------------------- classify


@pytest.mark.parametrize("event, kinds", [
    (TEXT, CONTENT),
    (EMPTY_FINISH, FINISH),
    (CHAT_ROLE, 0),
    (CHAT_TEXT, CONTENT),
    (CHAT_FINISH, FINISH),
    (USAGE_EV, USAGE),
    (ERROR_EV, ERROR),
    (b"data: [DONE]", DONE),
    (b": keep-alive comment", 0),
    (b'data: {"choices":[{"index":0,"text":"last","finish_reason":"length"}]}', CONTENT | FINISH),
    # spaces after colons (other servers) and a usage: null field on every chunk (vLLM)
    (b'data: {"choices": [{"text": "x", "finish_reason": null}], "usage": null}', CONTENT),
    # text that *mentions* keys must not fool the byte search: inner quotes are escaped in JSON
    (b'data: {"choices":[{"text":"\\"error\\" \\"finish_reason\\":\\"x","finish_reason":null}]}', CONTENT),
    (b'event: message\ndata: {"choices":[{"text":"a","finish_reason":null}]}', CONTENT),
])
def test_classify(event, kinds):
    assert classify(event) == kinds


def test_usage_tokens_parsed_only_from_a_valid_usage_chunk():
    assert usage_completion_tokens(USAGE_EV) == 7
    assert usage_completion_tokens(b'data: {"usage":{"completion_tokens":"7"}}') is None
    assert usage_completion_tokens(b"data: {not json") is None


# --------------------------------------------------------------------------- chunked decoding


def test_chunked_decodes_whole_body_and_keeps_the_tail():
    body = chunked(b"abc", b"defgh") + b"HTTP/1.1 200"
    dec = ChunkedDecoder()
    assert dec.feed(body) == b"abcdefgh"
    assert dec.done and dec.tail == b"HTTP/1.1 200"


def test_chunked_any_split_point_gives_the_same_payload():
    body = chunked(b"x" * 20, b"hello\r\nworld", b"z")
    for cut in range(len(body) + 1):
        dec = ChunkedDecoder()
        out = dec.feed(body[:cut]) + dec.feed(body[cut:])
        assert out == b"x" * 20 + b"hello\r\nworldz", cut
        assert dec.done


def test_chunked_byte_by_byte_with_extensions_and_trailers():
    body = b"3;name=v\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    dec = ChunkedDecoder()
    out = b"".join(dec.feed(body[i:i + 1]) for i in range(len(body)))
    assert out == b"abc" and dec.done and dec.tail == b""


def test_chunked_streams_partial_chunk_data_at_once():
    dec = ChunkedDecoder()
    assert dec.feed(b"a\r\n01234") == b"01234"
    assert dec.feed(b"56789\r\n") == b"56789"
    assert not dec.done


@pytest.mark.parametrize("body", [b"zz\r\nabc\r\n", b"3\r\nabcXY", b"f" * 5000])
def test_chunked_rejects_bad_framing(body):
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(body)


# --------------------------------------------------------------------------- stream accounting


def test_account_times_gaps_and_usage():
    acc = StreamAccount()
    acc.feed(CHAT_ROLE + b"\n\n", 1.0)          # role only: not a token
    acc.feed(CHAT_TEXT + b"\n\n" + CHAT_TEXT[:30], 1.5)
    acc.feed(CHAT_TEXT[30:] + b"\n\n", 1.6)
    acc.feed(CHAT_TEXT + b"\n\n" + CHAT_TEXT + b"\n\n", 2.0)  # two in one read: one gap of 0
    assert acc.t_first == 1.5 and acc.events == 4
    assert list(acc.gaps) == pytest.approx([0.1, 0.4, 0.0])
    assert acc.tokens == 4 and not acc.done
    acc.feed(CHAT_FINISH + b"\n\n" + USAGE_EV + b"\n\ndata: [DONE]\n\n", 2.5)
    assert acc.finished and acc.done and acc.complete and acc.t_done == 2.5
    assert acc.tokens == 7  # usage wins over counted events


def test_account_error_event_is_not_complete():
    acc = StreamAccount()
    acc.feed(TEXT + b"\n\n" + ERROR_EV + b"\n\ndata: [DONE]\n\n", 1.0)
    assert acc.error and acc.done and not acc.complete


def test_account_crlf_events():
    acc = StreamAccount()
    acc.feed(TEXT + b"\r", 1.0)
    acc.feed(b"\n\r\ndata: [DONE]\r\n\r\n", 2.0)
    assert acc.events == 1 and acc.t_first == 2.0 and acc.done


def test_account_through_the_decoder_split_everywhere():
    body = chunked(TEXT + b"\n\n", TEXT + b"\n\n", EMPTY_FINISH + b"\n\n", b"data: [DONE]\n\n")
    for cut in range(0, len(body), 7):
        dec, acc = ChunkedDecoder(), StreamAccount()
        acc.feed(dec.feed(body[:cut]), 1.0)
        acc.feed(dec.feed(body[cut:]), 2.0)
        assert (acc.events, acc.complete, dec.done) == (2, True, True), cut


# --------------------------------------------------------------------------- HTTP head and request


def test_parse_head():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    assert parse_head(head) == (200, True, None, False)
    head = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 12\r\nConnection: close\r\n\r\n"
    assert parse_head(head) == (503, False, 12, True)
    with pytest.raises(ProtocolError):
        parse_head(b"garbage\r\n\r\n")


def test_build_request_has_exact_content_length():
    req = build_request("127.0.0.1", 8000, "/v1/completions", {"prompt": "héllo", "stream": True})
    head, body = req.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"Content-Length: %d" % len(body) in head
    assert json.loads(body) == {"prompt": "héllo", "stream": True}


# --------------------------------------------------------------------------- stats


def test_percentile_interpolates():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))


def test_distribution_ms():
    d = distribution_ms([0.001 * i for i in range(1, 101)])
    assert d["count"] == 100 and d["max"] == 100.0
    assert d["p50"] == pytest.approx(50.5) and d["p99"] == pytest.approx(99.01)
    assert distribution_ms([])["p50"] is None


def test_summarize_windows_ramp_and_failures():
    ws, we = 10.0, 20.0
    recs = [
        RequestRecord(start=5.0, end=12.0, status=200, ttft=0.5, events=10, tokens=10, ramp=True),
        RequestRecord(start=11.0, end=13.0, status=200, ttft=0.1, events=10, tokens=10),
        RequestRecord(start=19.0, end=25.0, status=200, ttft=0.3, events=10, tokens=10),  # ends after window
        RequestRecord(start=12.0, end=12.1, status=503, failure="http_503"),
        RequestRecord(start=13.0, end=14.0, status=200, failure="truncated", ttft=0.2, events=3, tokens=3),
    ]
    s = summarize(recs, [0.01, 0.02], ws, we)
    assert s["requests"] == {"ok": 2, "failed": 2, "failures": {"http_503": 1, "truncated": 1},
                             "ramp": 1, "ramp_failed": 0}
    assert s["rps"] == pytest.approx(0.2)                   # ramp-started one ending at 12 + the one at 13
    assert s["output_tokens_per_s"] == pytest.approx(2.0)
    assert s["ttft_ms"]["count"] == 2 and s["ttft_ms"]["max"] == 300.0  # ok, measured only
    assert s["itl_ms"]["p50"] == pytest.approx(15.0)
    assert "http_503=1" in format_summary(s)


def test_summarize_requests_mode_window_ends_with_last_request():
    recs = [RequestRecord(start=0.0, end=2.0, status=200, tokens=5),
            RequestRecord(start=1.0, end=4.0, status=200, tokens=5)]
    s = summarize(recs, [], 0.0, None)
    assert s["window_s"] == 4.0 and s["rps"] == 0.5 and s["output_tokens_per_s"] == 2.5
