"""A blocking request/reply client for the head's control socket (CLI and tests).

Runs in the CLI process; owns one DEALER per call, closed before returning. Never waits past `timeout`:
an unreachable head is a `HeadUnreachable` error, not a hang.
"""
from __future__ import annotations

from typing import Any

import zmq

from runtime.curve import CurveKeys
from runtime.protocol import (
    PROTOCOL_VERSION, ControlReply, DeleteRequest, DeployRequest, ScaleRequest, StatusReply, StatusRequest,
    decode_frames, encode,
)


class HeadUnreachable(RuntimeError):
    pass


class HeadRefused(RuntimeError):
    pass


def request(endpoint: str, msg: Any, timeout: float = 3.0) -> Any:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys = CurveKeys.load(None)  # $TOKENRELAY_CURVE_DIR
    if keys is not None:
        keys.connect_as_client(sock)
    try:
        sock.connect(endpoint)
        sock.send_multipart(encode(msg))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise HeadUnreachable("no answer from the head at %s within %.1fs" % (endpoint, timeout))
        reply = decode_frames(sock.recv_multipart())
    finally:
        sock.close(0)
    if isinstance(reply, ControlReply) and not reply.ok:
        raise HeadRefused("%s: %s" % (reply.code, reply.message))
    return reply


def status(endpoint: str, token: str, timeout: float = 3.0) -> StatusReply:
    reply = request(endpoint, StatusRequest(PROTOCOL_VERSION, token), timeout)
    if not isinstance(reply, StatusReply):
        raise HeadRefused("unexpected reply %s" % type(reply).__name__)
    return reply


def deploy(endpoint: str, token: str, spec: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
    return request(endpoint, DeployRequest(token, spec), timeout).data


def scale(endpoint: str, token: str, name: str, replicas: int, timeout: float = 3.0) -> dict[str, Any]:
    return request(endpoint, ScaleRequest(token, name, replicas), timeout).data


def delete(endpoint: str, token: str, name: str, timeout: float = 3.0) -> dict[str, Any]:
    return request(endpoint, DeleteRequest(token, name), timeout).data
