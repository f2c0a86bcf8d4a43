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
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import zmq
import zmq.auth

log = logging.getLogger(__name__)

ROLES = ("agent", "proxy", "operator")
SERVERS = ("head", "replica")
REGISTRY = "registry"
REVOKED = "revoked"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}\Z")  # room for a fully qualified host name; no "..", ".x"


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
        raise KeyFileError("key name %r: use letters, digits, '.', '_' or '-', not starting with '.' or '-' "
                           "(at most 253)" % name)


def make_private_dir(path: Path) -> None:
    """`path` as a 0700 directory of ours. Refuses a directory another user owns or a shared one (sticky
    bit, like /tmp): whoever else controls it could read the secrets or plant links where they go."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the state dir, when keys/ comes first
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = os.stat(path)
    except OSError as exc:  # e.g. $TOKENRELAY_STATE_DIR names a file, or a place we may not write
        raise KeyFileError("cannot make the key directory %s: %s: %s" % (path, exc.filename, exc.strerror)) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & stat.S_ISVTX:
        raise KeyFileError("%s: not a directory of our own (another user's, or shared like /tmp): keys go "
                           "only into a private directory" % path)
    os.chmod(path, 0o700)


def write_new(path: Path, text: str, mode: int) -> Path:
    """Create `path` with `mode` from its first byte: never over an existing file and never through a
    link (O_EXCL), so there is no moment when a secret is readable by others."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError:
        raise KeyFileError("%s exists already; remove or revoke it first" % path) from None
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, mode)  # the umask may have taken bits off a public file
        fh.write(text)
    return path


def _cert(public: bytes, secret: Optional[bytes], metadata: dict[str, str]) -> str:
    """A key file in the ZeroMQ certificate format (what zmq.auth.load_certificate reads)."""
    lines = ["#   ZeroMQ CURVE %s Certificate (tokenrelay keys)" % ("**Secret**" if secret else "Public"),
             "", "metadata"] + ["    %s = %s" % kv for kv in metadata.items()]
    lines += ["curve", '    public-key = "%s"' % public.decode()]
    if secret is not None:
        lines.append('    secret-key = "%s"' % secret.decode())
    return "\n".join(lines) + "\n"


def _create(directory: Path, stem: str, metadata: dict[str, str]) -> tuple[Path, Path]:
    if (directory / (stem + ".key_secret")).exists() or (directory / (stem + ".key")).exists():
        raise KeyFileError("%s already holds key %s; remove or revoke it first" % (directory, stem))
    public, secret = zmq.curve_keypair()
    return (write_new(directory / (stem + ".key"), _cert(public, None, {}), 0o644),
            write_new(directory / (stem + ".key_secret"), _cert(public, secret, metadata), 0o600))


def _copy(source: Path, target: Path) -> Path:
    return write_new(target, source.read_text(), 0o600 if target.name.endswith(".key_secret") else 0o644)


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
    _copy(public, registry / (stem + ".key"))
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
    written = [_copy(directory / name, target / name) for name in names]
    if role == "agent":
        make_private_dir(target / REGISTRY)
        for key in sorted((directory / REGISTRY).glob("proxy-*.key")):
            written.append(_copy(key, target / REGISTRY / key.name))
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
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip("-.") or "x"


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
            raise KeyFileError("%s holds %d %s keys (%s); exactly one is needed (`tokenrelay keys add %s NAME` "
                               "where the cluster's keys are, then its files here)"
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
    add takes effect at the next lookup), and at least every RESCAN seconds: a directory's mtime has the
    kernel's coarse clock tick, so two changes within one tick (a scripted add-then-revoke) leave it
    unchanged after the first, and that revocation would otherwise never be seen. Lookups by z85 key."""

    RESCAN = 1.0  # seconds

    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self._clock = clock
        self._stamp: Optional[tuple[int, int]] = None
        self._scanned = float("-inf")
        self._peers: dict[bytes, Peer] = {}
        self._revoked: dict[bytes, Peer] = {}

    def _mtime(self, sub: str) -> int:
        try:
            return (self.directory / sub).stat().st_mtime_ns
        except OSError:
            return -1

    def _reload(self) -> None:
        stamp = (self._mtime(REGISTRY), self._mtime(REVOKED))
        now = self._clock()
        if stamp == self._stamp and now - self._scanned < self.RESCAN:
            return
        self._peers = self._scan(REGISTRY)
        self._revoked = self._scan(REVOKED)
        self._stamp = stamp
        self._scanned = now

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
