"""runtime.addresses.port_in_use against real sockets: what `tokenrelay up` checks before it starts."""
from __future__ import annotations

import socket

from runtime.addresses import port_in_use


def test_a_listening_port_is_in_use_and_a_closed_one_is_free():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ's and gunicorn's do
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        assert port_in_use("0.0.0.0", port)  # a wildcard bind collides with it too
        with socket.create_connection(("127.0.0.1", port)) as client:
            server, _ = listener.accept()
            server.close()  # a closed connection in TIME_WAIT on that port
            client.close()
    assert not port_in_use("127.0.0.1", port)


def test_an_address_that_is_not_ours_is_left_to_the_process_that_binds_it():
    assert not port_in_use("192.0.2.1", 8000)  # TEST-NET-1: EADDRNOTAVAIL, not "in use"
