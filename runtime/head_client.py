"""A blocking request/reply client for the head's control socket (CLI and tests).

Runs in the CLI process; owns one DEALER per call, closed before returning. Never waits past `timeout`:
an unreachable head is a `HeadUnreachable` error, not a hang. The DEALER is a CURVE client with the
operator key of `keys` (default: runtime.curve.keys_dir(); the one operator-NAME.key_secret there, or
$TOKENRELAY_OPERATOR's), plain only with $TOKENRELAY_INSECURE=1 (a WARNING says the admin token goes in
clear text). Without a usable operator key nothing is sent: `NoOperatorKey` says why.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import zmq

from runtime import curve, keyring
from runtime.protocol import (
    PROTOCOL_VERSION, ControlReply, DeleteRequest, DeployRequest, ScaleRequest, StatusReply, StatusRequest,
    decode_frames, encode,
)

log = logging.getLogger(__name__)


class HeadUnreachable(RuntimeError):
    pass


class HeadRefused(RuntimeError):
    pass


class NoOperatorKey(HeadUnreachable):
    """No operator key to talk to the head with: the admin token is never sent in clear text by default."""


Keys = Optional[Union[str, Path]]


def _secure(sock: zmq.Socket[bytes], keys: Keys) -> str:
    """Make `sock` a CURVE client with the operator key; returns what the error hint should say."""
    if keys is None and curve.insecure_from_env():
        log.warning("$%s is set: sending to the head WITHOUT CURVE, the admin token in clear text",
                    curve.INSECURE_ENV)
        return " (plain socket: $%s is set)" % curve.INSECURE_ENV
    directory = Path(keys) if keys is not None else curve.keys_dir()
    try:
        me = keyring.identity(directory, "operator", os.environ.get(curve.OPERATOR_ENV) or None)
        head = keyring.server_public(directory, "head")
    except (keyring.KeyFileError, ValueError) as exc:  # ValueError: a bad $TOKENRELAY_OPERATOR name
        raise NoOperatorKey("no operator key to reach the head securely: %s. Name one with $%s=NAME, or set "
                            "$%s=1 if the head really runs --insecure (the admin token then goes in clear "
                            "text)" % (exc, curve.OPERATOR_ENV, curve.INSECURE_ENV)) from exc
    curve.connect(sock, me, head)
    # a CURVE handshake that fails is silent: say what else than "not running" it may be
    return (" (as %s-%s): is it running? A head started with --insecure answers only with $%s=1; one of "
            "another cluster, or that revoked this key, never answers it" % (me.role, me.name, curve.INSECURE_ENV))


def request(endpoint: str, msg: Any, timeout: float = 3.0, keys: Keys = None) -> Any:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        how = _secure(sock, keys)
    except NoOperatorKey:
        sock.close(0)
        raise
    try:
        sock.connect(endpoint)
        sock.send_multipart(encode(msg))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise HeadUnreachable("no answer from the head at %s within %.1fs%s" % (endpoint, timeout, how))
        reply = decode_frames(sock.recv_multipart())
    finally:
        sock.close(0)
    if isinstance(reply, ControlReply) and not reply.ok:
        raise HeadRefused("%s: %s" % (reply.code, reply.message))
    return reply


def status(endpoint: str, token: str, timeout: float = 3.0, keys: Keys = None) -> StatusReply:
    reply = request(endpoint, StatusRequest(PROTOCOL_VERSION, token), timeout, keys)
    if not isinstance(reply, StatusReply):
        raise HeadRefused("unexpected reply %s" % type(reply).__name__)
    return reply


def deploy(endpoint: str, token: str, spec: dict[str, Any], timeout: float = 3.0,
           keys: Keys = None) -> dict[str, Any]:
    return request(endpoint, DeployRequest(token, spec), timeout, keys).data


def scale(endpoint: str, token: str, name: str, replicas: int, timeout: float = 3.0,
          keys: Keys = None) -> dict[str, Any]:
    return request(endpoint, ScaleRequest(token, name, replicas), timeout, keys).data


def delete(endpoint: str, token: str, name: str, timeout: float = 3.0,
           keys: Keys = None) -> dict[str, Any]:
    return request(endpoint, DeleteRequest(token, name), timeout, keys).data
