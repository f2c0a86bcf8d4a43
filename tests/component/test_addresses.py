"""runtime.addresses.bind_problem against real sockets: what `tokenrelay up` checks before it starts."""
from __future__ import annotations

import socket

from runtime.addresses import bind_problem


def test_a_listening_port_is_in_use_and_a_closed_one_is_free():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ's and gunicorn's do
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert bind_problem("127.0.0.1", port) == "in use"
        assert bind_problem("0.0.0.0", port) == "in use"  # a wildcard bind collides with it too
        with socket.create_connection(("127.0.0.1", port)) as client:
            server, _ = listener.accept()
            server.close()  # a closed connection in TIME_WAIT on that port
            client.close()
    assert bind_problem("127.0.0.1", port) is None


def test_an_address_that_is_not_this_hosts():
    assert bind_problem("192.0.2.1", 8000) == "not an address of this host"  # TEST-NET-1
