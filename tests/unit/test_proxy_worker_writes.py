"""proxy.gunicorn_worker: a one-piece answer is written in WRITE_SLICE pieces. gunicorn sends each item
of the WSGI result with one sendall, and gevent's sendall timeout (--send-timeout, the client socket's)
bounds the whole call: a multi-MB JSON answer (logprobs, many choices) to a client that reads steadily
but slowly would be cut off as if it had stopped reading. (A real socket test would need an answer
larger than the kernel's send buffer, several MB, read for over a minute.) No sockets."""
from __future__ import annotations

from typing import Any

from proxy.gunicorn_worker import WRITE_SLICE, ProxyGeventWorker


def serve(result: list[bytes]) -> Any:
    worker = ProxyGeventWorker.__new__(ProxyGeventWorker)  # no gunicorn arbiter: only _serve is used
    worker._expecting = set()
    worker._app = lambda environ, start: (start("200 OK", []), result)[1]
    return worker._serve({}, lambda status, headers, exc_info=None: None)


def test_a_large_answer_goes_out_in_slices_that_add_up_to_it() -> None:
    body = bytes(range(256)) * 1000  # 256,000 bytes
    parts = list(serve([b"head", body]))
    assert max(len(p) for p in parts) <= WRITE_SLICE and len(parts) == 1 + 4
    assert b"".join(parts) == b"head" + body


def test_a_small_answer_is_passed_through_untouched() -> None:
    result = [b'{"status":"ok"}']
    assert serve(result) is result
