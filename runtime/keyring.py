"""The cluster's CURVE keys on disk: who may connect, as which role. The one definition of that fact.

Runs in every process that opens a ZeroMQ socket, and in `tokenrelay keys`; owns no socket (files only).
Layout of a key directory (default STATE_DIR/keys; `--curve-dir` or $TOKENRELAY_CURVE_DIR):

    head.key, head.key_secret         the head's server keypair (the secret only on the head's host)
    replica.key, replica.key_secret   the replicas' server keypair (the secret only on agent hosts)
    ROLE-NAME.key_secret              this host's own identity: agent-ID, proxy-NAME, operator-NAME
    registry/ROLE-NAME.key            public keys the head accepts (and, role proxy, replicas accept)
    revoked/ROLE-NAME.key             revoked keys: moved here by `tokenrelay keys revoke`

An agent's key name is its agent id: the head accepts agent messages from key `agent-ID` only for agent
ID. The directory is 0700 and every secret file 0600. Never writes over an existing key.
"""
from __future__ import annotations

import getpass
import logging
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import zmq
import zmq.auth

log = logging.getLogger(__name__)

ROLES = ("agent", "proxy", "operator")
SERVERS = ("head", "replica")
REGISTRY = "registry"
REVOKED = "revoked"
_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,252}$")  # room for a fully qualified host name


class KeyFileError(ValueError):
    """A missing, unreadable or ill-named key; the message says which file and what to run."""


@dataclass(frozen=True)
class Peer:
    """Who a CURVE client key belongs to, as the registry says."""

    role: str
    name: str

    @property
    def label(self) -> str:
        return "%s-%s" % (self.role, self.name)


@dataclass(frozen=True)
class Identity:
    """A process's own keypair."""

    role: str
    name: str
    public: bytes
    secret: bytes


def check_name(role: str, name: str) -> None:
    if role not in ROLES:
        raise KeyFileError("role must be one of %s, got %r" % (", ".join(ROLES), role))
    if not _NAME.match(name):
        raise KeyFileError("key name %r: use letters, digits, '.', '_' or '-' (at most 253)" % name)


def make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _create(directory: Path, stem: str, metadata: dict[str, str]) -> tuple[Path, Path]:
    if (directory / (stem + ".key_secret")).exists() or (directory / (stem + ".key")).exists():
        raise KeyFileError("%s already holds key %s; remove or revoke it first" % (directory, stem))
    public, secret = zmq.auth.create_certificates(str(directory), stem, metadata=metadata)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def init_cluster(directory: Path) -> list[Path]:
    """The head's and the replicas' server keypairs, and the empty registry. Refuses to overwrite."""
    if (directory / "head.key_secret").exists():
        raise KeyFileError("%s already holds a cluster (head.key_secret)" % directory)
    make_private_dir(directory)
    make_private_dir(directory / REGISTRY)
    make_private_dir(directory / REVOKED)
    paths: list[Path] = []
    for server in SERVERS:
        paths += _create(directory, server, {"role": server})
    return paths


def add(directory: Path, role: str, name: str, out: Optional[Path] = None) -> list[Path]:
    """A new ROLE-NAME keypair: its public key joins the registry, its secret (with the server public keys
    that host needs) goes to `out` (default: `directory` itself, for a single host). Returns the files
    written for that host."""
    check_name(role, name)
    stem = "%s-%s" % (role, name)
    if not (directory / "head.key").exists():
        raise KeyFileError("%s holds no cluster: run `tokenrelay keys init` first" % directory)
    registry = directory / REGISTRY
    make_private_dir(registry)
    if (registry / (stem + ".key")).exists() or (directory / REVOKED / (stem + ".key")).exists():
        raise KeyFileError("key %s exists already (or was revoked): pick another name" % stem)
    target = out or directory
    make_private_dir(target)
    public, secret = _create(target, stem, {"role": role, "name": name})
    shutil.copy(public, registry / (stem + ".key"))
    if target != directory:
        public.unlink()  # the host needs only its secret file (which holds the public key too)
    written = [secret]
    if target != directory:
        written += _copy_host_files(directory, target, role)
    return written


def _copy_host_files(directory: Path, target: Path, role: str) -> list[Path]:
    """What a host of `role` needs besides its own secret: the servers' public keys it connects to, and an
    agent host the replicas' secret and the proxies' public keys (its replicas accept only those)."""
    names = ["head.key"]
    if role in ("proxy", "agent"):
        names.append("replica.key")
    if role == "agent":
        names.append("replica.key_secret")
    written = []
    for name in names:
        shutil.copy(directory / name, target / name)
        written.append(target / name)
    if role == "agent":
        make_private_dir(target / REGISTRY)
        for key in sorted((directory / REGISTRY).glob("proxy-*.key")):
            shutil.copy(key, target / REGISTRY / key.name)
            written.append(target / REGISTRY / key.name)
    for path in written:
        if path.name.endswith(".key_secret"):
            os.chmod(path, 0o600)
    return written


def revoke(directory: Path, role: str, name: str) -> Path:
    """Move ROLE-NAME's public key out of the registry: servers refuse it from the next connection on (the
    head also from its next message)."""
    check_name(role, name)
    stem = "%s-%s.key" % (role, name)
    source = directory / REGISTRY / stem
    if not source.exists():
        raise KeyFileError("no key %s in %s" % (stem, directory / REGISTRY))
    make_private_dir(directory / REVOKED)
    target = directory / REVOKED / stem
    os.replace(source, target)
    return target


def ensure_single_host(directory: Path, agent_id: Optional[str]) -> bool:
    """Everything one host running the whole stack needs, created on first start; True if anything was.
    A key revoked here is not recreated (KeyFileError): revoking means it."""
    created = False
    if not (directory / "head.key_secret").exists():
        init_cluster(directory)
        created = True
    os.chmod(directory, 0o700)
    wanted = [("proxy", local_name()), ("operator", local_name())]
    if agent_id is not None:
        wanted.insert(0, ("agent", agent_id))
    for role, name in wanted:
        created = ensure(directory, role, name) or created
    return created


def ensure(directory: Path, role: str, name: str) -> bool:
    """ROLE-NAME's keypair in `directory` itself (a single host), created unless it exists here or was
    issued to another host (registered or revoked already)."""
    stem = "%s-%s" % (role, name)
    if (directory / (stem + ".key_secret")).exists() or (directory / REGISTRY / (stem + ".key")).exists() \
            or (directory / REVOKED / (stem + ".key")).exists():
        return False
    add(directory, role, name)
    return True


def local_name() -> str:
    """This host's default proxy/operator key name (letters the key-name rule allows)."""
    raw = "%s.%s" % (_safe(getpass.getuser()), _safe(socket.gethostname()))
    return raw[:63]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip("-") or "x"


# --------------------------------------------------------------------------- reading keys


def server_public(directory: Path, server: str) -> bytes:
    path = directory / ("%s.key" % server)
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError("cannot read %s: %s (see `tokenrelay keys`)" % (path, exc)) from exc
    return public


def server_pair(directory: Path, server: str) -> tuple[bytes, bytes]:
    path = directory / ("%s.key_secret" % server)
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError("cannot read %s: %s (this host must hold the %s's secret key)"
                        % (path, exc, server)) from exc
    if secret is None:
        raise KeyFileError("%s holds no secret key" % path)
    return public, secret


def identity(directory: Path, role: str, name: Optional[str] = None) -> Identity:
    """This process's keypair: ROLE-NAME.key_secret, or with no name the only ROLE-*.key_secret here."""
    if name is not None:
        check_name(role, name)
        path = directory / ("%s-%s.key_secret" % (role, name))
    else:
        found = sorted(directory.glob("%s-*.key_secret" % role))
        if len(found) != 1:
            raise KeyFileError("%s holds %d %s keys (%s); exactly one is needed (`tokenrelay keys add %s`)"
                            % (directory, len(found), role, ", ".join(p.name for p in found) or "none", role))
        path = found[0]
        name = path.name[len(role) + 1:-len(".key_secret")]
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError("cannot read %s: %s (create it with `tokenrelay keys add %s %s`)"
                        % (path, exc, role, name)) from exc
    if secret is None:
        raise KeyFileError("%s holds no secret key" % path)
    return Identity(role, name, public, secret)


class Registry:
    """The public keys a server accepts, re-read whenever registry/ or revoked/ changes (a revoke or an
    add takes effect at the next lookup). Lookups by z85 public key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp: Optional[tuple[int, int]] = None
        self._peers: dict[bytes, Peer] = {}
        self._revoked: dict[bytes, Peer] = {}

    def _mtime(self, sub: str) -> int:
        try:
            return (self.directory / sub).stat().st_mtime_ns
        except OSError:
            return -1

    def _reload(self) -> None:
        stamp = (self._mtime(REGISTRY), self._mtime(REVOKED))
        if stamp == self._stamp:
            return
        self._peers = self._scan(REGISTRY)
        self._revoked = self._scan(REVOKED)
        self._stamp = stamp

    def _scan(self, sub: str) -> dict[bytes, Peer]:
        out: dict[bytes, Peer] = {}
        for path in sorted((self.directory / sub).glob("*.key")):
            role, sep, name = path.name[:-len(".key")].partition("-")
            if not sep or role not in ROLES:
                log.warning("ignoring key file %s: not ROLE-NAME.key with a role of %s", path, ROLES)
                continue
            try:
                public, _ = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable key file %s: %s", path, exc)
                continue
            out[public] = Peer(role, name)
        return out

    def lookup(self, public_z85: bytes) -> tuple[Optional[Peer], str]:
        """(peer, "") for a registered key; (None or the revoked peer, reason) otherwise."""
        self._reload()
        peer = self._peers.get(public_z85)
        if peer is not None:
            return peer, ""
        revoked = self._revoked.get(public_z85)
        if revoked is not None:
            return revoked, "revoked"
        return None, "unknown_key"

    def revoked(self) -> frozenset[Peer]:
        self._reload()
        return frozenset(self._revoked.values())

    def listing(self) -> list[tuple[str, str, str]]:
        """(ROLE-NAME, state, z85 public key) of every key, registered then revoked."""
        self._reload()
        rows = [(p.label, "active", k.decode()) for k, p in self._peers.items()]
        rows += [(p.label, "revoked", k.decode()) for k, p in self._revoked.items()]
        return sorted(rows, key=lambda r: (r[1], r[0]))


def z85_public(secret_or_public_file: Path) -> bytes:
    public, _ = zmq.auth.load_certificate(str(secret_or_public_file))
    return public
