"""The replica server: ZeroMQ in front of one engine.

Runs in model_proc's asyncio loop (one thread). Owns two sockets, both used only from that loop:
- data ROUTER (binds `config.bind`): proxies' DEALERs send GenerateRequest/Abort; we answer with one
  TokenBatch per proxy worker per loop iteration (all new deltas of that worker's requests), RequestError
  for a failed request, ReplicaDead when the engine dies. Every TokenBatch carries the replica's load
  (requests it holds), and when that load changes the workers no TokenBatch told get an empty one with
  it (model_proc.load_push), so proxies admit against a fresh count, not a 1 s old table.
  ROUTER_MANDATORY makes a vanished proxy an error we act on (its requests are aborted) instead of tokens
  silently dropped.
- agent DEALER (connects `config.agent`; model_proc.agent_link): ReplicaHello once, then ReplicaStatus
  every status interval from the loop itself, so a stuck loop stops the heartbeat.
With a key directory (runtime.curve) the data ROUTER is a CURVE server with the replicas' keypair that
admits proxy keys only (a ZAP thread on our context decides; refusals are counted in
tokenrelay_replica_auth_refused_total), and the agent DEALER connects with the agent's own key. Each
GenerateRequest's key is checked against the registry again (model_proc.data_access), so a proxy key
revoked (or removed) on this host gets 403 on a connection it opened before.
Must never block the loop and never queue without bound: sends are non-blocking and a peer whose queue
is full (slow or gone) has its requests aborted.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any, Optional, Sequence

import zmq
import zmq.asyncio

from model_proc import metrics
from model_proc.agent_link import AgentLink
from model_proc.config import EXIT_CRASH, EXIT_ENGINE_DIED, EXIT_LOAD_ERROR, EXIT_OK, EXIT_USAGE, ReplicaConfig
from model_proc.data_access import DataAccess
from model_proc.engine import Engine, EngineLoadError, EngineRequestError
from model_proc.load_push import LoadPush
from model_proc.ttft_window import TtftWindow
from pathlib import Path

from runtime import authz, curve
from runtime.gc_policy import prepare_to_serve, run_paced_async
from runtime.keyring import server_pair
from runtime.protocol import (
    KEY_REFUSED, PROTOCOL_VERSION, SHUTTING_DOWN, Abort, Delta, GenerateRequest, ProtocolError, ReplicaDead,
    ReplicaHello, ReplicaStatus, RequestError, TokenBatch, decode, encode, error_type_for, loggable_identity,
)

log = logging.getLogger(__name__)

DATA_HWM = 100_000  # messages per peer; a proxy that falls this far behind is treated as gone


class _Route:
    __slots__ = ("peer", "completion_tokens", "received_at")

    def __init__(self, peer: bytes, received_at: Optional[float] = None) -> None:
        self.peer = peer
        self.completion_tokens = 0
        self.received_at = received_at  # monotonic time the request arrived; None once its first token left


def _pacer_done(task: "asyncio.Future[None]") -> None:
    """The GC pacer ended: cancelled at shutdown, or died; CPython's automatic collection goes on alone,
    so a death is logged, not fatal to a replica that serves well without it."""
    if not task.cancelled() and task.exception() is not None:
        log.error("[gc] the collection pacer died: %r; automatic collection goes on alone", task.exception())


class ReplicaServer:
    def __init__(self, config: ReplicaConfig, engine: Engine,
                 ctx: Optional[zmq.asyncio.Context] = None) -> None:
        self.config = config
        self.engine = engine
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._routes: dict[str, _Route] = {}
        self._outbox: dict[bytes, list[Delta]] = {}
        self._flush_scheduled = False
        self._ready = False
        self._loads = LoadPush(lambda: len(self._routes), self._send_load)
        self._draining = False
        self._stop = asyncio.Event()
        self._exit_code = EXIT_OK
        self.endpoint = ""
        # counters reported in ReplicaStatus
        self.steps = 0
        self.tokens_generated = 0
        self.requests_finished = 0
        self.requests_aborted = 0
        self.errors = 0
        self.batches_sent = 0
        self.ttft = TtftWindow()  # first tokens of the last 10 s: ReplicaStatus.ttft_p90_s
        self.last_status: Optional[ReplicaStatus] = None  # read by model_proc.metrics at scrape time

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        cfg = self.config
        self._data = self._ctx.socket(zmq.ROUTER)
        self._data.setsockopt(zmq.LINGER, 0)
        self._data.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a proxy that reconnects with the same identity takes over its old (possibly half-open) pipe
        self._data.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._data.setsockopt(zmq.SNDHWM, DATA_HWM)
        self._data.setsockopt(zmq.RCVHWM, DATA_HWM)
        keys = Path(cfg.curve_dir) if cfg.curve_dir else None
        self._access: Optional[DataAccess] = None
        if keys is not None:
            self._access = DataAccess(self._ctx, keys)
            curve.serve(self._data, server_pair(keys, "replica"), authz.REPLICA_DATA)
        try:
            self._data.bind(cfg.bind)
        except zmq.ZMQError as exc:  # e.g. an agent --host that is not this host's: say so, and never restart
            log.error("[startup] cannot bind the data socket to %s: %s", cfg.bind, exc.strerror)
            self._data.close(0)
            if self._access is not None:
                self._access.stop()
            return EXIT_USAGE
        self.endpoint = self._data.getsockopt_string(zmq.LAST_ENDPOINT)
        self._agent = AgentLink(self._ctx, cfg, keys)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        exporter = metrics.start(self, cfg.metrics_host, cfg.metrics_port)
        log.info("[startup] data endpoint %s, engine %s, model %s, metrics port %s", self.endpoint, cfg.engine,
                 cfg.model, exporter.port if exporter else "off")
        hello = ReplicaHello(PROTOCOL_VERSION, cfg.replica_id, self.endpoint, os.getpid(),
                             exporter.port if exporter else 0, cfg.deployment, cfg.generation)
        self._agent.send(hello)
        status_task = self._supervised(self._agent.heartbeat(hello, self._send_status, self._stop), "status loop")
        recv_task: Optional[asyncio.Future] = None
        gc_task: Optional[asyncio.Future] = None
        try:
            try:
                await self.engine.start(self)
            except EngineLoadError as exc:
                log.error("[startup] engine cannot load: %s", exc)
                self._broadcast_dead("engine failed to load: %s" % exc)
                self._exit_code = EXIT_LOAD_ERROR
                return EXIT_LOAD_ERROR
            self._ready = True
            prepare_to_serve("replica")  # as `vllm serve` does after start-up (runtime/gc_policy.py)
            gc_task = asyncio.ensure_future(run_paced_async(lambda: len(self._routes)))
            gc_task.add_done_callback(_pacer_done)
            log.info("[startup] ready")
            recv_task = self._supervised(self._recv_loop(), "receive loop")
            await self._stop.wait()
            if self._draining:
                await self._drain()
            return self._exit_code
        finally:
            status_task.cancel()
            self._loads.cancel()
            for task in (recv_task, gc_task):
                if task is not None:
                    task.cancel()
            try:
                await self.engine.shutdown()
            except Exception:  # shutting down anyway; say what went wrong
                log.exception("[shutdown] engine shutdown failed")
            self._send_status()
            self._data.close(0)
            self._agent.close()
            if self._access is not None:
                self._access.stop()
            if exporter is not None:
                exporter.close()
            log.info("[shutdown] replica stopped (exit %d)", self._exit_code)

    def _supervised(self, coro: Any, what: str) -> "asyncio.Task[None]":
        """Run a long-lived loop as a task whose crash kills the replica loudly: an exception there (in
        the receive loop: handling a request or an abort) leaves state nobody knows, and a replica that
        stopped reading but still reports READY would hang every client. So: ReplicaDead to every proxy
        and the agent, then exit EXIT_CRASH (the agent restarts it)."""
        task: asyncio.Task[None] = asyncio.ensure_future(coro)

        def done(t: "asyncio.Task[None]") -> None:
            if t.cancelled() or t.exception() is None:
                return
            exc = t.exception()
            log.error("[failover] %s crashed; the replica dies", what, exc_info=exc)
            self.fatal("%s crashed: %s: %s" % (what, type(exc).__name__, exc), EXIT_CRASH)
        task.add_done_callback(done)
        return task

    def _on_signal(self, sig: int) -> None:
        log.info("[shutdown] signal %d: draining for up to %.1fs", sig, self.config.drain_seconds)
        self._draining = True
        self._stop.set()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_seconds
        while self._routes and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._routes):
            self.engine.abort(request_id)
            self.error(request_id, 503, "replica shut down before the request finished", etype=SHUTTING_DOWN)

    # ------------------------------------------------------------------ sockets

    async def _recv_loop(self) -> None:
        secure = self._access is not None
        while True:
            user = ""
            if secure:  # keep the User-Id our ZAP handler gave the connection (runtime.zap)
                parts = await self._data.recv_multipart(copy=False)
                try:
                    user = str(parts[-1].get("User-Id"))
                except zmq.ZMQError:  # no ZAP verdict on this connection: refused below as unknown_key
                    pass
                frames = [p.bytes for p in parts]
            else:
                frames = await self._data.recv_multipart()
            if len(frames) != 3:
                log.warning("dropping message with %d frames", len(frames))
                continue
            peer = frames[0]
            try:
                msg = decode(frames[1], frames[2])
            except ProtocolError as exc:
                log.warning("dropping bad message from %s: %s", loggable_identity(peer), exc)
                continue
            if self._access is not None and isinstance(msg, GenerateRequest):
                reason = self._access.refusal(user, msg.request_id)
                if reason:  # 403 to a key no longer registered as a proxy's, though ZAP let it connect
                    self._send(peer, RequestError(msg.request_id, 403, "this proxy's key is not accepted (%s)"
                                                  % reason, KEY_REFUSED))
                    continue
            self._loads.peers.add(peer)
            if isinstance(msg, GenerateRequest):
                self._on_generate(peer, msg)
            elif isinstance(msg, Abort):
                self._on_abort(peer, msg)
            else:
                log.warning("unexpected %s from %s", type(msg).__name__, loggable_identity(peer))

    def _on_generate(self, peer: bytes, req: GenerateRequest) -> None:
        rid = req.request_id
        if self._draining:
            self._send(peer, RequestError(rid, 503, "replica is shutting down", SHUTTING_DOWN))
            return
        if rid in self._routes:
            self._send(peer, RequestError(rid, 400, "duplicate request id %s" % rid, "invalid_request_error"))
            return
        route = self._routes[rid] = _Route(peer, time.monotonic())
        if req.resume is not None:
            if not getattr(self.engine, "supports_resume", False):
                del self._routes[rid]
                self._send(peer, RequestError(rid, 501, "engine %s cannot resume a request" % self.engine.name,
                                              "server_error", "resume"))
                return
            route.completion_tokens = len(req.resume.token_ids)  # generated (and counted) elsewhere
        try:
            self.engine.add_request(req)
        except EngineRequestError as exc:  # a 4xx is the request's fault; a 5xx (engine dead, cannot resume) not
            del self._routes[rid]
            self._send(peer, RequestError(rid, exc.status, str(exc), error_type_for(exc.status), exc.param))
        except Exception as exc:  # an engine bug must fail this request, not the replica
            log.exception("request %s: engine refused it", rid)
            self.error(rid, 500, "engine error: %s" % exc)
        self._loads.changed()

    def _on_abort(self, peer: bytes, msg: Abort) -> None:
        for rid in msg.request_ids:
            route = self._routes.get(rid)
            if route is not None and route.peer == peer:
                del self._routes[rid]
                self.engine.abort(rid)
                self.requests_aborted += 1
                log.debug("request %s aborted by its proxy", rid)
        self._loads.changed()

    def _send(self, peer: bytes, msg: object) -> bool:
        """Non-blocking send to one proxy; on failure abort everything of that proxy."""
        fut: Any = self._data.send_multipart([peer] + encode(msg), flags=zmq.NOBLOCK)  # an asyncio Future
        exc = fut.exception() if fut.done() else None
        if exc is None:
            return True
        if isinstance(exc, zmq.Again):
            log.warning("proxy %s is not reading (queue full); aborting its requests", loggable_identity(peer))
        else:
            log.info("proxy %s is gone (%s); aborting its requests", loggable_identity(peer), exc)
        self._drop_peer(peer)
        return False

    def _send_load(self, peer: bytes, load: int) -> None:
        self._send(peer, TokenBatch([], load))

    def _drop_peer(self, peer: bytes) -> None:
        self._loads.forget(peer)
        self._outbox.pop(peer, None)
        for rid in [rid for rid, route in self._routes.items() if route.peer == peer]:
            del self._routes[rid]
            self.engine.abort(rid)
            self.requests_aborted += 1
        self._loads.changed()

    def _broadcast_dead(self, reason: str) -> None:
        dead = ReplicaDead(self.config.replica_id, reason)
        for peer in list(self._loads.peers):
            self._send(peer, dead)
        self._agent.send(dead)

    # ------------------------------------------------------------------ DeltaSink (called by the engine)

    def emit(self, request_id: str, text: str, finish_reason: Optional[str],
             prompt_tokens: int, completion_tokens: int, token_ids: Sequence[int] = ()) -> None:
        route = self._routes.get(request_id)
        if route is None:
            return  # aborted meanwhile
        if route.received_at is not None:  # its first delta: time to first token, for the autoscaler
            now = time.monotonic()
            self.ttft.observe(now, now - route.received_at)
            route.received_at = None
        self.tokens_generated += completion_tokens - route.completion_tokens
        route.completion_tokens = completion_tokens
        if finish_reason is not None:
            del self._routes[request_id]
            self.requests_finished += 1
        box = self._outbox.get(route.peer)
        if box is None:
            box = self._outbox[route.peer] = []
        box.append(Delta(request_id, text, finish_reason, prompt_tokens, completion_tokens, list(token_ids)))
        if not self._flush_scheduled:
            # everything emitted in this loop iteration (one engine step) leaves in one message per peer
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def error(self, request_id: str, status: int, message: str, param: Optional[str] = None,
              body: bytes = b"", etype: Optional[str] = None) -> None:
        route = self._routes.pop(request_id, None)
        if route is None:
            return
        self.errors += 1
        log.warning("request %s failed (%d): %s", request_id, status, message)
        if etype is None:
            etype = error_type_for(status)
        self._flush()  # deltas before the error must arrive first
        self._send(route.peer, RequestError(request_id, status, message, etype, param, body))
        self._loads.changed()

    def fatal(self, reason: str, exit_code: int = EXIT_ENGINE_DIED) -> None:
        if self._exit_code != EXIT_OK:
            return  # dead already
        log.error("[failover] replica dies: %s", reason)
        self._flush()
        self._broadcast_dead(reason)
        self._routes.clear()
        self._exit_code = exit_code
        self._stop.set()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox:
            return
        self.steps += 1
        outbox, self._outbox = self._outbox, {}
        self.batches_sent += len(outbox)
        load = len(self._routes)
        for peer, deltas in outbox.items():
            self._loads.told(peer, load)
            self._send(peer, TokenBatch(deltas, load))
        self._loads.changed()

    # ------------------------------------------------------------------ status / heartbeat

    @property
    def in_flight(self) -> int:  # read by model_proc.metrics (another thread: a len() of a dict is safe)
        return len(self._routes)

    @property
    def connected_proxies(self) -> int:
        return len(self._loads.peers)

    def status(self) -> ReplicaStatus:
        stats = self.engine.stats() if self._ready else None
        return ReplicaStatus(
            replica_id=self.config.replica_id, ready=self._ready and not self._draining,
            running=stats.running if stats else 0, waiting=stats.waiting if stats else 0,
            kv_cache_usage=stats.kv_cache_usage if stats else 0.0, steps=self.steps,
            tokens_generated=self.tokens_generated, requests_finished=self.requests_finished,
            requests_aborted=self.requests_aborted, errors=self.errors,
            ttft_p90_s=self.ttft.p90(time.monotonic()), model_card=self.engine.model_card if self._ready else b"")

    def _send_status(self) -> None:
        self.last_status = self.status()
        self._agent.send(self.last_status)
