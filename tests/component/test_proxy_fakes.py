"""Fake head and fake replica for the proxy's component tests (real ZeroMQ sockets, plain threads).

Runs in the pytest process. Each fake owns its sockets inside its own thread (created, used and closed
there) and binds tcp://127.0.0.1:* (the endpoint is read back from LAST_ENDPOINT). Holds no tests itself
beyond a self-check of the fakes.

Fake replica script, chosen by the prompt (for chat: the last message's content):
  "error-before"  RequestError 400 before any token
  "error-mid"     two deltas, then RequestError 500
  "slow"          one delta every 20 ms until aborted (or 30 s)
  "die"           one delta, then the ROUTER closes without a word (like SIGKILL)
  "dead"          one delta, then ReplicaDead
  anything else   "Hello", ",", " world", "!" in two TokenBatches, finish_reason "stop"
A replica made with `refuse=True` answers every request with RequestError 503 (an overloaded or
broken replica that is still in the routing table).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Optional

import zmq

from tests.support import wait_for  # noqa: F401  (re-exported to the component tests)
from runtime.protocol import (
    PROTOCOL_VERSION, TABLE_TOPIC, Abort, Delta, DeploymentRoute, GenerateRequest, HeadHello, HeadInfo,
    ReplicaDead, ReplicaRoute, RequestError, RoutingTable, SnapshotRequest, TokenBatch, decode_frames, encode,
)

WORDS = ["Hello", ",", " world", "!"]
TEXT = "".join(WORDS)


class _Fake(threading.Thread):
    """`keys` (an object whose serve(sock) makes it a CURVE server): serve CURVE on every bound socket;
    give a `ctx` with a ZAP handler then."""

    def __init__(self, name: str, ctx: Optional[zmq.Context] = None, keys: Any = None) -> None:
        super().__init__(name=name, daemon=True)
        self._ctx = ctx or zmq.Context.instance()
        self._keys = keys
        self._up = threading.Event()
        self._halt = threading.Event()
        self.error: Optional[BaseException] = None

    def start_and_wait(self) -> "_Fake":
        self.start()
        assert self._up.wait(5), "%s did not start" % self.name
        return self

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            self._keys.serve(sock)
        return sock


class FakeReplica(_Fake):
    def __init__(self, replica_id: str, ctx: Optional[zmq.Context] = None, keys: Any = None,
                 refuse: bool = False) -> None:
        super().__init__("fake-replica-" + replica_id, ctx, keys)
        self.replica_id = replica_id
        self.refuse = refuse
        self.endpoint = ""
        self.requests: list[GenerateRequest] = []
        self.aborts: list[str] = []
        self.peers: set[bytes] = set()
        self._slow: dict[str, tuple[bytes, int]] = {}  # request_id -> (peer, deltas sent)

    def route(self) -> ReplicaRoute:
        return ReplicaRoute(self.replica_id, self.endpoint, 0, 0, 0.0, 64)

    def run(self) -> None:
        sock = self._socket(zmq.ROUTER)
        try:
            sock.bind("tcp://127.0.0.1:*")
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._up.set()
            while not self._halt.is_set():
                if sock.poll(20):
                    frames = sock.recv_multipart()
                    if self._handle(sock, frames[0], decode_frames(frames)) == "die":
                        sock.close(linger=2000)  # flush the delta, then drop the connection unannounced
                        return
                self._tick(sock)
        except BaseException as exc:  # surfaced by tests that check .error
            self.error = exc
        finally:
            sock.close(linger=0)

    def _send(self, sock: zmq.Socket, peer: bytes, msg: object) -> None:
        sock.send_multipart([peer] + encode(msg))

    def _handle(self, sock: zmq.Socket, peer: bytes, msg: object) -> Optional[str]:
        self.peers.add(peer)
        if isinstance(msg, Abort):
            self.aborts.extend(msg.request_ids)
            for rid in msg.request_ids:
                self._slow.pop(rid, None)
            return None
        assert isinstance(msg, GenerateRequest), msg
        self.requests.append(msg)
        rid = msg.request_id
        prompt = msg.prompt if msg.prompt is not None else (msg.messages or [])[-1].content
        ptoks = len(prompt.split())
        if self.refuse:
            self._send(sock, peer, RequestError(rid, 503, "replica %s is overloaded" % self.replica_id))
        elif prompt == "error-before":
            self._send(sock, peer, RequestError(rid, 400, "the replica rejects this prompt",
                                                "invalid_request_error", "prompt"))
        elif prompt == "error-mid":
            self._send(sock, peer, TokenBatch([Delta(rid, "Hel", None, ptoks, 1), Delta(rid, "lo", None, ptoks, 2)]))
            self._send(sock, peer, RequestError(rid, 500, "engine exploded"))
        elif prompt == "slow":
            self._slow[rid] = (peer, 0)
        elif prompt in ("die", "dead"):
            self._send(sock, peer, TokenBatch([Delta(rid, "Hel", None, ptoks, 1)]))
            if prompt == "dead":
                self._send(sock, peer, ReplicaDead(self.replica_id, "CUDA error: device lost"))
            else:
                return "die"
        else:
            self._send(sock, peer, TokenBatch([Delta(rid, WORDS[0], None, ptoks, 1),
                                               Delta(rid, WORDS[1], None, ptoks, 2)]))
            self._send(sock, peer, TokenBatch([Delta(rid, WORDS[2], None, ptoks, 3),
                                               Delta(rid, WORDS[3], "stop", ptoks, 4)]))
        return None

    def _tick(self, sock: zmq.Socket) -> None:
        for rid, (peer, sent) in list(self._slow.items()):
            if sent >= 1500:
                self._send(sock, peer, TokenBatch([Delta(rid, "", "length", 1, sent)]))
                del self._slow[rid]
                continue
            self._send(sock, peer, TokenBatch([Delta(rid, "tok ", None, 1, sent + 1)]))
            self._slow[rid] = (peer, sent + 1)


class FakeHead(_Fake):
    """Head control ROUTER + routing PUB; republishes the table every `interval` seconds."""

    def __init__(self, epoch: int = 1, interval: float = 0.2, control_port: int = 0,
                 ctx: Optional[zmq.Context] = None, keys: Any = None) -> None:
        super().__init__("fake-head", ctx, keys)
        self._control_bind = "tcp://127.0.0.1:%s" % (control_port or "*")
        self.epoch = epoch
        self.version = 1
        self.interval = interval
        self.deployments: list[DeploymentRoute] = []
        self.control = ""
        self.publish = ""
        self.hellos = 0
        self.hello_endpoints: list[str] = []  # HeadHello.http_endpoint of each hello
        self.snapshots = 0
        self.paused = threading.Event()  # set: answer nothing, publish nothing (head down)
        self._lock = threading.Lock()
        self._dirty = False

    def set_deployments(self, deployments: list[DeploymentRoute]) -> None:
        with self._lock:
            self.deployments = list(deployments)
            self.version += 1
            self._dirty = True

    def table(self) -> RoutingTable:
        with self._lock:
            return RoutingTable(self.epoch, self.version, time.time(), list(self.deployments))

    def run(self) -> None:
        router = self._socket(zmq.ROUTER)
        pub = self._socket(zmq.PUB)
        try:
            self._bind_with_retry(router, self._control_bind)
            pub.bind("tcp://127.0.0.1:*")
            self.control = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.publish = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self._up.set()
            next_pub = 0.0
            while not self._halt.is_set():
                if router.poll(20):
                    frames = router.recv_multipart()
                    if not self.paused.is_set():
                        self._answer(router, frames[0], decode_frames(frames))
                now = time.monotonic()
                if not self.paused.is_set() and (self._dirty or now >= next_pub):
                    self._dirty = False
                    pub.send_multipart([TABLE_TOPIC] + encode(self.table()))
                    next_pub = now + self.interval
        except BaseException as exc:
            self.error = exc
        finally:
            router.close(linger=0)
            pub.close(linger=0)

    @staticmethod
    def _bind_with_retry(sock: zmq.Socket, endpoint: str) -> None:
        # A head restarted on its old port: libzmq may still be releasing the previous listener.
        deadline = time.monotonic() + 5
        while True:
            try:
                sock.bind(endpoint)
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _answer(self, router: zmq.Socket, peer: bytes, msg: object) -> None:
        if isinstance(msg, HeadHello):
            self.hellos += 1
            self.hello_endpoints.append(msg.http_endpoint)
            reply: object = HeadInfo(PROTOCOL_VERSION, self.epoch, self.publish)
        elif isinstance(msg, SnapshotRequest):
            self.snapshots += 1
            reply = self.table()
        else:
            return
        router.send_multipart([peer] + encode(reply))


def test_fakes_answer_over_real_sockets() -> None:
    replica = FakeReplica("r-self").start_and_wait()
    head = FakeHead().start_and_wait()
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    control = ctx.socket(zmq.DEALER)
    control.setsockopt(zmq.LINGER, 0)
    try:
        head.set_deployments([DeploymentRoute("tiny", "fake", "fake", [replica.route()])])
        control.connect(head.control)
        control.send_multipart(encode(SnapshotRequest(PROTOCOL_VERSION)))
        assert control.poll(5000)
        table = decode_frames(control.recv_multipart())
        assert isinstance(table, RoutingTable) and table.deployments[0].replicas[0].endpoint == replica.endpoint
        dealer.connect(replica.endpoint)
        dealer.send_multipart(encode(GenerateRequest("x-1", prompt="hi")))
        text = ""
        while not text.endswith("!"):
            assert dealer.poll(5000)
            batch = decode_frames(dealer.recv_multipart())
            text += "".join(d.text for d in batch.deltas)
        assert text == TEXT
    finally:
        dealer.close(0)
        control.close(0)
        replica.stop()
        head.stop()
    assert replica.error is None and head.error is None
