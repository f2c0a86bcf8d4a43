"""The agent's listening sockets at start, with real sockets in this process."""
from __future__ import annotations

import socket

from agent.config import config_from_args
from agent.server import Agent


def test_a_metrics_port_in_use_is_exit_2_not_a_crash(caplog):
    """It was an OSError traceback and exit 1, which `tokenrelay up` restarted in a loop."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_from_args(["--head", "tcp://127.0.0.1:1", "--insecure", "--metrics-port", str(port)])
        assert Agent(config).run() == 2
    assert "cannot listen (--replica-endpoint tcp://127.0.0.1:*, --metrics-host 127.0.0.1 --metrics-port %d)" \
        % port in caplog.text and "Address already in use" in caplog.text
