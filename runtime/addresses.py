"""Addresses in a stack config and on the CLI: what they must look like, and whether one is taken.

Runs in the launcher (`tokenrelay up`) and the CLI; `bind_problem` opens (and at once closes) one
unlistened TCP socket per check, nothing else here touches the network. Errors are `ValueError`s naming
the config key or flag to change.

`tokenrelay up` checks every address its head and proxy will bind before it starts any process: a second
`up` with the same ports would otherwise start an agent that registers with the FIRST stack's head
under the same agent name, whose replicas then leave that head's routing table, while its own head
cannot bind.
"""
from __future__ import annotations

import errno
import socket
from typing import Optional


IPV6_ZMQ = ("%s: IPv6 addresses are not supported on the ZeroMQ sockets (the processes do not turn on "
            "ZMQ_IPV6); use an IPv4 address or a host name, got %r")


def check_zmq_endpoint(value: str, where: str) -> str:
    """A ZeroMQ endpoint the processes accept: tcp://HOST:PORT (PORT may be `*`) or ipc://PATH."""
    if value.startswith("ipc://") and len(value) > len("ipc://"):
        return value
    if value.startswith("tcp://"):
        host, sep, port = value[len("tcp://"):].rpartition(":")
        if sep and host and (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
            if ":" in host:  # libzmq refuses to bind or connect it without ZMQ_IPV6 ("No such device")
                raise ValueError(IPV6_ZMQ % (where, value))
            return value
    raise ValueError("%s: must be a ZeroMQ endpoint like tcp://HOST:PORT or ipc://PATH, got %r" % (where, value))


def check_host_port(value: str, where: str) -> str:
    """HOST:PORT with a port from 1 to 65535 (the proxy's HTTP address), an IPv6 host in brackets."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("%s: must be HOST:PORT with a port from 1 to 65535, got %r" % (where, value))
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        # gunicorn reads "::1:8000" as host "::1:8000" with no port and exits 1 (a crash to a supervisor)
        raise ValueError("%s: an IPv6 address goes in brackets, [%s]:%s, got %r" % (where, host, port, value))
    return value


def bracket_host(host: str) -> str:
    """A host as it goes before ":PORT": an IPv6 address in brackets (`::1` -> `[::1]`)."""
    return "[%s]" % host if ":" in host and not host.startswith("[") else host


def check_host(value: str, where: str) -> str:
    """A host name or IPv4 address, as replicas bind tcp://HOST:* (not an endpoint, no port)."""
    if ":" in value and _is_ipv6(value.strip("[]")):
        raise ValueError(IPV6_ZMQ % (where, value))
    if not value or "://" in value or "/" in value or ":" in value or any(c.isspace() for c in value):
        raise ValueError("%s: must be a host name or IP address (no scheme, no port), got %r" % (where, value))
    return value


def check_metrics_port(value: int, where: str) -> int:
    """A /metrics port: 1-65535, 0 (the OS picks one) or negative (off)."""
    if value > 65535:
        raise ValueError("%s: must be at most 65535 (0: a free port, -1: off), got %d" % (where, value))
    return value


def _is_ipv6(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        return False
    return True


def tcp_address(value: str) -> Optional[tuple[str, int]]:
    """(host, port) a process will listen on for a tcp:// endpoint or a HOST:PORT; None when the OS picks
    the port (`*`, 0) or it is not TCP (ipc://)."""
    if value.startswith("ipc://"):
        return None
    host, _, port = value.split("://", 1)[-1].rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None
    host = host.strip("[]")
    return ("0.0.0.0" if host in ("*", "") else host), int(port)


BIND_PROBLEMS = {errno.EADDRINUSE: "in use", errno.EADDRNOTAVAIL: "not an address of this host",
                 errno.EACCES: "a port below 1024 needs privileges"}


def bind_problem(host: str, port: int) -> Optional[str]:
    """Why a process could not listen on host:port ("in use", ...), or None. Only the failures in
    BIND_PROBLEMS count; any other (a name that does not resolve) is left to the process that binds it,
    which says so in its own words."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as ZeroMQ and gunicorn do: a port whose old connections linger in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return BIND_PROBLEMS.get(exc.errno or 0)
    return None
