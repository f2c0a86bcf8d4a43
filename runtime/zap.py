"""The ZAP handler: decides, per CURVE handshake, whether a client key may connect to a server socket.

Runs as one thread in each process that binds a CURVE server socket (head, agent, replica), on that
process's ZeroMQ context; owns one REP socket bound to inproc://zeromq.zap.01, used only by its thread.
libzmq asks it about every new connection to a socket with `curve_server` set; the socket's `zap_domain`
says which (runtime.authz). An accepted peer gets the User-Id "ROLE-NAME:Z85KEY", which libzmq attaches
to each message it receives from that connection (`Frame.get("User-Id")`): the head reads it per message.
Never blocks libzmq longer than a registry lookup; never raises out of the thread (a bad request is
answered with 500 and logged).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import zmq
from zmq.utils import z85

from runtime.authz import AGENT_REPLICAS, connect_refusal
from runtime.keyring import Identity, Peer, Registry

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
OnRefused = Callable[[str, str, str], None]  # (role or "unknown", reason, who) -> count and log


def user_id(peer: Peer, public_z85: bytes) -> bytes:
    return b"%s:%s" % (peer.label.encode(), public_z85)


def parse_user_id(text: str) -> tuple[Optional[Peer], bytes]:
    """(Peer, z85 key) from a User-Id this handler made; (None, b"") for anything else."""
    label, sep, key = text.partition(":")
    role, dash, name = label.partition("-")
    if not sep or not dash:
        return None, b""
    return Peer(role, name), key.encode()


class ZapHandler:
    """Answers ZAP requests from the registry; `own` is the agent's identity, the only key its
    AGENT_REPLICAS socket accepts (an agent host's registry need not list its own key)."""

    def __init__(self, ctx: zmq.Context, registry: Registry, on_refused: OnRefused,
                 own: Optional[Identity] = None) -> None:
        self._ctx = ctx
        self.registry = registry
        self._on_refused = on_refused
        self._own = own
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)

    def start(self) -> "ZapHandler":
        self._thread.start()
        self._ready.wait(5)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def decide(self, domain: str, public_z85: bytes) -> tuple[bool, bytes, str]:
        """(accepted, user id, reason) for one handshake."""
        own = self._own
        if domain == AGENT_REPLICAS and own is not None and public_z85 == own.public:
            peer: Optional[Peer] = Peer("agent", own.name)
            reason = ""
        else:
            peer, reason = self.registry.lookup(public_z85)
        refusal = connect_refusal(domain, peer, reason, own.name if own is not None else None)
        if refusal is None and peer is not None:
            return True, user_id(peer, public_z85), ""
        who = peer.label if peer is not None else "key %s" % public_z85.decode()[:8]
        self._on_refused(peer.role if peer is not None else "unknown", refusal or "unknown_key",
                         "%s on %s" % (who, domain))
        return False, b"", refusal or "unknown_key"

    def _run(self) -> None:
        try:
            sock = self._ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart()
                sock.send_multipart(self._answer(frames))
        finally:
            sock.close(0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            log.warning("malformed ZAP request with %d frames", len(frames))
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"malformed", b"", b""]
        version, request_id, domain, _address, _identity, mechanism = frames[:6]
        if mechanism != b"CURVE" or len(frames) < 7:
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        try:
            ok, uid, reason = self.decide(domain.decode(errors="replace"), z85.encode(frames[6]))
        except Exception:
            log.exception("ZAP decision failed; refusing the connection")
            return [version, request_id, b"500", b"internal error", b"", b""]
        if ok:
            return [version, request_id, b"200", b"OK", uid, b""]
        return [version, request_id, b"400", reason.encode(), b"", b""]
