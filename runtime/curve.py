"""ZeroMQ CURVE encryption and authentication for every socket that crosses hosts.

Runs in every process that opens such a socket; owns no socket itself (it configures the caller's).
Off unless a key directory is configured (`--curve-dir` or $TOKENRELAY_CURVE_DIR). Layout, as written
by `tokenrelay keys generate DIR`:

    DIR/server.key, DIR/server.key_secret   the cluster's server keypair: head and replicas serve with it
    DIR/client.key, DIR/client.key_secret   a client keypair: proxies, agents and the CLI connect with it
    DIR/authorized/*.key                    client public keys the servers accept (ZAP)

Hosts that run servers (head, agents' replicas) need the server secret and `authorized/`; hosts that only
connect (proxies) need `server.key` and a client keypair. Sockets bound on loopback for one host only
(the agent's replica socket) stay plain.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import zmq
import zmq.auth

log = logging.getLogger(__name__)

CURVE_ENV = "TOKENRELAY_CURVE_DIR"


class CurveConfigError(ValueError):
    pass


@dataclass(frozen=True)
class CurveKeys:
    directory: Path
    server_public: bytes
    server_secret: Optional[bytes]  # None on hosts that only connect
    client_public: Optional[bytes]
    client_secret: Optional[bytes]

    @classmethod
    def load(cls, directory: Optional[str]) -> Optional["CurveKeys"]:
        """Keys from `directory` (or $TOKENRELAY_CURVE_DIR); None when CURVE is not configured."""
        directory = directory or os.environ.get(CURVE_ENV)
        if not directory:
            return None
        d = Path(directory)
        try:
            server_public, server_secret = _pair(d / "server.key_secret", d / "server.key")
            client_public, client_secret = _pair(d / "client.key_secret", d / "client.key")
        except (OSError, ValueError) as exc:
            raise CurveConfigError("curve dir %s: %s (create it with `tokenrelay keys generate`)" % (d, exc)) from exc
        if server_public is None:
            raise CurveConfigError("curve dir %s: server.key is missing" % d)
        return cls(d, server_public, server_secret, client_public, client_secret)

    def serve(self, sock: zmq.Socket) -> None:
        """Make a binding socket a CURVE server (before bind)."""
        if self.server_secret is None:
            raise CurveConfigError("curve dir %s: server.key_secret is needed to serve" % self.directory)
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def connect_as_client(self, sock: zmq.Socket) -> None:
        """Make a connecting socket a CURVE client of the cluster's servers (before connect)."""
        if self.client_secret is None or self.client_public is None:
            raise CurveConfigError("curve dir %s: client.key and client.key_secret are needed" % self.directory)
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public

    def start_authenticator(self, ctx: zmq.Context) -> Any:
        """ZAP handler in a thread: only clients whose public key is in authorized/ may connect."""
        from zmq.auth.thread import ThreadAuthenticator
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(self.directory / "authorized"))
        return auth


def _pair(secret_file: Path, public_file: Path) -> tuple[Optional[bytes], Optional[bytes]]:
    if secret_file.exists():
        public, secret = zmq.auth.load_certificate(str(secret_file))
        return public, secret
    if public_file.exists():
        public, _ = zmq.auth.load_certificate(str(public_file))
        return public, None
    return None, None


def generate(directory: Path) -> list[Path]:
    """Write a server and a client keypair and authorize the client. Refuses to overwrite keys."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "server.key_secret").exists():
        raise CurveConfigError("%s already holds keys; remove them first to regenerate" % directory)
    authorized = directory / "authorized"
    authorized.mkdir(exist_ok=True)
    server_public, server_secret = zmq.auth.create_certificates(str(directory), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(directory), "client")
    shutil.copy(client_public, authorized / "client.key")
    for secret in (server_secret, client_secret):
        os.chmod(secret, 0o600)
    return [Path(p) for p in (server_public, server_secret, client_public, client_secret)]
