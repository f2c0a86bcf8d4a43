"""Helpers shared by every test tier: free ports, polling for a condition, and a recording DeltaSink.

Ports: a test that must tell a process its port in advance (the stack's head and proxy) cannot let the
process bind port 0, so `free_port` picks one. It draws at random from a range below the kernel's
ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default): the outgoing connections of
every test and process take their local ports from that range, so a port picked from it could be taken
again between the check and the bind (the bind-close-reuse race). A pick outside it can only collide with
another test's pick, which the random draw over ~12,000 ports makes rare, and each pick is checked free.
"""
from __future__ import annotations

import random
import socket
import time
from typing import Any, Callable, Optional, Sequence

_PORTS = (20000, 32000)
_random = random.SystemRandom()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, outside the ephemeral range (see the module doc)."""
    for _ in range(200):
        port = _random.randrange(*_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in %d-%d" % _PORTS)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


class RecordingSink:
    """A replica engine's DeltaSink (model_proc.engine) that records, in order, each emit as (request id,
    text, finish reason) and each error as (request id, status, message); a fatal fails the test."""

    def __init__(self) -> None:
        self.emits: list[tuple[str, str, Optional[str]]] = []
        self.errors: list[tuple[str, int, str]] = []

    def emit(self, request_id: str, text: str, finish_reason: Optional[str], prompt_tokens: int,
             completion_tokens: int, token_ids: Sequence[int] = ()) -> None:
        self.emits.append((request_id, text, finish_reason))

    def error(self, request_id: str, status: int, message: str, param: Optional[str] = None,
              body: bytes = b"") -> None:
        self.errors.append((request_id, status, message))

    def fatal(self, reason: str) -> None:
        raise AssertionError(reason)
