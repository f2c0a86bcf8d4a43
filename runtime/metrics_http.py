"""Serving a process's Prometheus metrics over HTTP: GET /metrics on HOST:PORT, in a daemon thread.

Runs in the head, the agent and model_proc (the proxy has its own /metrics route). Owns one listening TCP
socket and the exporter thread that prometheus_client starts for it. The thread only renders: it reads
prometheus values (thread-safe) and collectors that read immutable snapshots or plain numbers, never the
owning loop's mutable state, so the process keeps one concurrency model for its own work. Never import an
event loop or a zmq context here.

What one endpoint serves: the package's own registry (its `tokenrelay_<role>_*` metrics) plus prometheus
-client's default registry (`process_*`, `python_*`, and, in a vLLM replica, vLLM's own `vllm:*`).
"""
from __future__ import annotations

import logging
import socket
from typing import Any, Iterator, Optional

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DISABLED = -1  # a --metrics-port of -1 (any negative) turns the endpoint off


class DefaultRegistry(Collector):
    """Forwards prometheus-client's default registry (read at each scrape, so late registrations count)."""

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()


def registry_with_defaults() -> CollectorRegistry:
    """A fresh registry that also serves the default one; per instance, so tests can build many."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DefaultRegistry())
    return registry


class MetricsServer:
    """The exporter of one registry; `port` is the bound port (useful with port 0)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = int(self._httpd.server_port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def serve(registry: CollectorRegistry, host: str, port: int) -> Optional[MetricsServer]:
    """Start the exporter unless `port` is negative. Raises OSError when the port cannot be bound."""
    if port < 0:
        return None
    return MetricsServer(registry, host, port)


def endpoint_host(zmq_endpoint: str) -> tuple[str, str]:
    """(bind host, advertised host) for a metrics port next to a ZeroMQ endpoint.

    tcp://10.0.0.5:7100 -> ("10.0.0.5", "10.0.0.5"); a wildcard (`*`, 0.0.0.0) binds every interface and
    advertises the host name; ipc:// and anything odd -> loopback.
    """
    scheme, sep, rest = zmq_endpoint.partition("://")
    host = rest.rpartition(":")[0].strip("[]") if scheme == "tcp" and sep else ""
    if host in ("*", "0.0.0.0", "::"):
        return "0.0.0.0", socket.gethostname()
    if not host:
        return "127.0.0.1", "127.0.0.1"
    return host, host
