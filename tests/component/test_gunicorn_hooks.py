"""proxy.gunicorn_hooks.linger_close on a real socket pair."""
from __future__ import annotations

import socket

from proxy.gunicorn_hooks import linger_close


def test_linger_close_lets_the_client_read_the_answer_then_ends_the_connection() -> None:
    server, client = socket.socketpair()
    try:
        client.sendall(b"x" * 100000)  # the rest of a refused body, unread
        server.sendall(b"HTTP/1.1 413 Payload Too Large\r\n\r\n")
        linger_close(server, seconds=0.2, max_bytes=1 << 20)
        assert client.recv(100).startswith(b"HTTP/1.1 413")
        assert client.recv(100) == b""  # FIN: the server is done
        assert server.recv(10) == b""  # and reads nothing more
    finally:
        server.close()
        client.close()
