"""ZeroMQ CURVE on every socket: which key directory a process uses, and how a socket is made secure.

Runs in every process that opens a ZeroMQ socket; owns no socket (it configures the caller's, before
bind or connect). Security is on by default: `python -m head|agent|model_proc|proxy` and the CLI use the
key directory `--curve-dir`, else $TOKENRELAY_CURVE_DIR, else STATE_DIR/keys (runtime.keyring describes
its layout; `tokenrelay up` creates it on first start). Plain sockets need `--insecure` (or
$TOKENRELAY_INSECURE=1), which each process logs at WARNING when it starts. Library classes built
without a key directory (in-process component tests) use plain sockets.

    socket                       server keypair     clients                   ZAP domain (runtime.authz)
    head control ROUTER, PUB     head               agents, proxies, CLI      control, publish
    replica data ROUTER          replica            proxies                   replica
    agent's replica ROUTER       the agent's own    its replicas (agent key)  agent-replicas
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import zmq

from runtime.credentials import state_dir
from runtime.keyring import Identity, KeyFileError
from runtime.settings import build_parser, parse_bool, parse_config

log = logging.getLogger(__name__)

CURVE_ENV = "TOKENRELAY_CURVE_DIR"
INSECURE_ENV = "TOKENRELAY_INSECURE"
OPERATOR_ENV = "TOKENRELAY_OPERATOR"  # which operator key the CLI uses where its key directory holds several
AGENT_KEY_ENV = "TOKENRELAY_REPLICA_AGENT"  # set by the agent for its replicas: whose key they connect with
KEYS_SUBDIR = "keys"

CurveConfigError = KeyFileError  # the name callers used before the key registry


def keys_dir(explicit: Optional[str] = None, state: Optional[str] = None) -> Path:
    """--curve-dir, else $TOKENRELAY_CURVE_DIR, else the state directory's keys/."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CURVE_ENV)
    if env:
        return Path(env)
    return state_dir(state) / KEYS_SUBDIR


def insecure_from_env() -> bool:
    """$TOKENRELAY_INSECURE as a boolean (unset: False); a bad value is a ValueError naming it."""
    text = os.environ.get(INSECURE_ENV, "")
    if not text:
        return False
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise ValueError("$%s: %s" % (INSECURE_ENV, exc)) from exc


C = TypeVar("C")


def parse_config_with_insecure_env(cls: type[C], argv: Optional[Sequence[str]], prog: str, description: str) -> C:
    """`parse_config` of a process config with an `insecure` field, which $TOKENRELAY_INSECURE can also
    set; a bad value there prints usage and exits 2, as a bad argument does (head and agent)."""
    config = parse_config(cls, argv, prog=prog, description=description)
    if not config.insecure:  # type: ignore[attr-defined]
        try:
            insecure = insecure_from_env()
        except ValueError as exc:
            build_parser(cls, prog=prog, description=description, env_prefix=None).error(str(exc))
        if insecure:
            config = dataclasses.replace(config, insecure=True)  # type: ignore[type-var]
    return config


def warn_insecure(process: str) -> None:
    log.warning("[startup] INSECURE MODE: %s runs with plain ZeroMQ sockets (--insecure): any process that "
                "can reach its ports can read and inject traffic. For benchmarks and debugging only.", process)


def serve(sock: zmq.Socket[Any], pair: tuple[bytes, bytes], domain: str) -> None:
    """Make a binding socket a CURVE server whose clients the ZAP handler vets for `domain` (before bind)."""
    sock.curve_publickey, sock.curve_secretkey = pair
    sock.curve_server = True
    sock.zap_domain = domain.encode()
    # without this libzmq admits ANY client key when no ZAP handler answers (not started yet, or its
    # thread gone): fail closed instead
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def connect(sock: zmq.Socket[Any], ident: Identity, server_public: bytes) -> None:
    """Make a connecting socket a CURVE client with this process's identity (before connect)."""
    sock.curve_publickey = ident.public
    sock.curve_secretkey = ident.secret
    sock.curve_serverkey = server_public


def client(ident: Identity, server_public: bytes) -> Callable[[zmq.Socket[Any]], None]:
    """`connect` bound to one identity and server: what proxy sockets take as `secure`."""
    def secure(sock: zmq.Socket[Any]) -> None:
        connect(sock, ident, server_public)
    return secure


def describe(directory: Optional[Path]) -> str:
    return "CURVE on (keys in %s)" % directory if directory is not None else "CURVE OFF (insecure)"
