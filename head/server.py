"""The head's reactor: a poll loop around the control ROUTER and the routing PUB.

Runs in the head process, one thread. Owns two sockets, used only from `Head.run`:
- control ROUTER (binds `config.control`): agents register and heartbeat (we answer each heartbeat with
  their full Assignment), proxies say hello and ask for snapshots (and tell of requests waiting for a
  scaled-to-zero deployment: ScaleDemand, not answered), the CLI asks for status.
- routing PUB (binds `config.publish`): the whole routing table on every change and every second.
Never blocks on a peer: every send is non-blocking; a message for a vanished peer is dropped.
With a key directory both sockets are CURVE servers (runtime.curve): a ZAP thread admits registered keys
and every control message is then checked against its sender's role and replica bindings (head.access); a
refusal is answered, logged with the key's name and counted (tokenrelay_head_auth_refused_total).
Each loop step catches and logs its own errors, so one bad message cannot kill the head.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import zmq

from head.access import ControlAccess
from head.autoscaler import Autoscaler, Decision, ProxyDemand
from head.cluster import ClusterState
from head.config import HeadConfig
from head.metrics import HeadMetrics
from head.store import StateStore
from head.table import TableVersions
from runtime import parent_guard
from runtime.credentials import token_matches
from runtime.metrics_http import endpoint_host
from runtime import authz, curve
from runtime.keyring import Registry, server_pair
from runtime.zap import RefusalLog, ZapHandler
from runtime.protocol import (
    PROTOCOL_VERSION, TABLE_TOPIC, AgentHeartbeat, AgentLeaving, AgentRegister, Assignment, AutoscaleStatus,
    ControlReply, DeleteRequest, DeployRequest, HeadHello, HeadInfo, ProtocolError, ScaleDemand, ScaleRequest,
    SnapshotRequest, StatusReply, StatusRequest, decode, encode, loggable_identity,
)
from runtime.stack_config import DeploymentSpec, check_replicas, parse_deployment

log = logging.getLogger(__name__)

TICK = 0.1  # seconds between housekeeping passes
REBIND_PATIENCE = 2.0  # seconds of retrying the publisher's own address before the configured one
UNAUTHORIZED = ("admin token required: pass --token, set TOKENRELAY_ADMIN_TOKEN, or run on the head's "
                "host where the token file in the state directory is readable")
WRONG_TOKEN = ("wrong admin token (--token, TOKENRELAY_ADMIN_TOKEN, or the admin.token file the CLI found): "
               "this head's is in admin.token in its state directory")


class Head:
    def __init__(self, config: HeadConfig, store: StateStore, admin_token: str,
                 seed: tuple[DeploymentSpec, ...] = (), clock: Callable[[], float] = time.monotonic,
                 ctx: Optional[zmq.Context] = None, reset: bool = False) -> None:
        """`store` holds the deployments to restore; `seed` (from a config file) fills a new state (or
        replaces the stored deployments with `reset`); otherwise what deploy/scale set is kept."""
        self.config = config
        self.clock = clock
        self.store = store
        self.admin_token = admin_token
        stored = store.load()
        self.state = ClusterState([spec for spec, _ in stored], agent_timeout=config.agent_timeout,
                                  generations={spec.name: gen for spec, gen in stored})
        self._seed(seed, reset)
        self.tables = TableVersions(epoch=store.next_epoch(), republish_interval=config.republish_interval)
        self.reconcile_seconds = 0.0
        self.scalers: dict[str, Autoscaler] = {}  # autoscaled deployments (head.autoscaler)
        self.demand = ProxyDemand()  # requests waiting in proxies for a scaled-to-zero deployment
        self.metrics = HeadMetrics(config.metrics_port, config.prometheus_sd_file, config.proxy_metrics)
        self._ctx = ctx or zmq.Context.instance()
        self._started = clock()
        self._stopping = False
        self._refusal_log = RefusalLog(log)
        self._access: Optional[ControlAccess] = None  # with a key directory (bind)
        self._auth: Optional[ZapHandler] = None
        self._pub: Optional[zmq.Socket] = None  # the table publisher; None while it is being bound again
        self._unbound_since = 0.0
        self._rebind_failed = False
        self.control_endpoint = ""
        self.publish_endpoint = ""

    def stop(self) -> None:
        self._stopping = True

    @property
    def recovering(self) -> bool:
        return self.clock() - self._started < self.config.recovery_grace

    def bind(self) -> None:
        keys = Path(self.config.curve_dir) if self.config.curve_dir else None
        if keys is not None:
            self._pair = server_pair(keys, "head")
            self._access = ControlAccess(Registry(keys), self.state, self.store, self._refused)
            self._auth = ZapHandler(self._ctx, self._access.registry, self._refused).start()
        self._control = self._ctx.socket(zmq.ROUTER)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.setsockopt(zmq.SNDHWM, 10_000)
        if keys is not None:
            curve.serve(self._control, self._pair, authz.CONTROL)
        self._control.bind(self.config.control)
        self.control_endpoint = self._control.getsockopt_string(zmq.LAST_ENDPOINT)
        self._bind_pub(self.config.publish)
        host = self.config.metrics_host
        self.metrics.start(*((host, host) if host else endpoint_host(self.control_endpoint)))
        log.info("[startup] control %s, publish %s, epoch %d, %d deployment(s), %s",
                 self.control_endpoint, self.publish_endpoint, self.tables.epoch, len(self.state.deployments),
                 curve.describe(keys))

    def _bind_pub(self, endpoint: str) -> None:
        """A new PUB socket bound to `endpoint` as self._pub; on a ZMQError it is closed and re-raised."""
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 100)
        if self._access is not None:
            curve.serve(pub, self._pair, authz.PUBLISH)
        try:
            pub.bind(endpoint)
        except zmq.ZMQError:
            pub.close(0)
            raise
        self._pub = pub
        self.publish_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)

    def _refused(self, role: str, reason: str, who: str) -> None:
        """Count and log one refusal (called from the loop and from the ZAP thread)."""
        self._refusal_log(who, reason)
        self.metrics.auth_refused.labels(role, reason).inc()

    def _check_revocations(self, now: float) -> None:
        """A key was revoked: forget the agent it named, and rebind the PUB socket so every subscriber
        reconnects through ZAP (a revoked proxy's subscription ends; the others resume within a second)."""
        if self._access is None:
            return
        new = self._access.newly_revoked(now)
        if not new:
            return
        log.warning("[auth] key(s) %s revoked: dropping their sessions", sorted(p.label for p in new))
        if self._pub is not None:
            self._pub.close(0)
            self._pub = None
            self._unbound_since = now
        self._rebind_pub(now)

    def _rebind_pub(self, now: float) -> None:
        """Bind the PUB socket again, each tick until it works: libzmq frees a closed socket's port in its
        I/O thread, so the first bind often finds it still in use. Past REBIND_PATIENCE the configured
        address is tried too (a port 0 there binds any free port; proxies find it through HeadHello)."""
        try:
            self._bind_pub(self.publish_endpoint)
        except zmq.ZMQError as exc:
            if now - self._unbound_since < REBIND_PATIENCE or self.config.publish == self.publish_endpoint:
                if not self._rebind_failed:
                    log.warning("[auth] rebinding %s: %s; retrying every tick (no table goes out meanwhile)",
                                self.publish_endpoint, exc)
                    self._rebind_failed = True
                return
            try:
                self._bind_pub(self.config.publish)
            except zmq.ZMQError as again:
                log.error("[auth] cannot bind %s either (%s); retrying", self.config.publish, again)
                return
        log.info("[auth] table publisher bound again on %s after %.2fs", self.publish_endpoint,
                 now - self._unbound_since)
        self._rebind_failed = False
        self.tables.force_next()

    def run(self) -> int:
        """Serve until stop() or SIGTERM/SIGINT. Returns the exit code."""
        if not hasattr(self, "_control"):
            self.bind()
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        poller = zmq.Poller()
        poller.register(self._control, zmq.POLLIN)
        next_tick = self.clock()
        parent = self.config.parent_pid
        try:
            while not self._stopping:
                if parent is not None and not parent_guard.parent_alive(parent):
                    log.error("[shutdown] parent %d is gone", parent)
                    break
                timeout = max(0.0, next_tick - self.clock())
                events = dict(poller.poll(math.ceil(timeout * 1000)))  # int() would spin through the last ms
                if self._control in events:
                    self._drain_control()
                if self.clock() >= next_tick:
                    next_tick = self.clock() + TICK
                    self._housekeeping()
        finally:
            self._control.close(0)
            if self._pub is not None:
                self._pub.close(0)
            if self._auth is not None:
                self._auth.stop()
            self.metrics.close()
            log.info("[shutdown] head stopped")
        return 0

    # ------------------------------------------------------------------ control socket

    def _drain_control(self) -> None:
        for _ in range(1000):  # bounded so housekeeping still runs under a flood
            try:
                parts = self._control.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                user = None
                if self._access is not None:
                    user = parts[-1].get("User-Id")  # set by our ZAP handler for this connection
                self._handle([p.bytes for p in parts], user)
            except Exception:
                log.exception("error handling a control message; going on")

    def _handle(self, frames: list[bytes], user: Optional[str] = None) -> None:
        if len(frames) != 3:
            log.warning("dropping control message with %d frames", len(frames))
            return
        peer = frames[0]
        try:
            msg = decode(frames[1], frames[2])
        except ProtocolError as exc:
            log.warning("dropping bad control message: %s", exc)
            self._reply(peer, ControlReply(False, "protocol", str(exc)))
            return
        now = self.clock()
        if self._access is not None:
            checked, refusal = self._access.check(user, msg, now)
            if checked is None:
                self._reply(peer, refusal)
                return
            msg = checked
        self.metrics.note(msg, str(user or ""))
        if isinstance(msg, AgentHeartbeat):
            if self.state.heartbeat(msg, now):
                self._send_assignment(peer, msg.agent_id)
            else:
                self._reply(peer, ControlReply(False, "unknown_agent", "register again"))
        elif isinstance(msg, AgentRegister):
            if msg.protocol != PROTOCOL_VERSION:
                self._reply(peer, ControlReply(False, "protocol", "head speaks protocol %d, agent %d"
                                               % (PROTOCOL_VERSION, msg.protocol)))
                return
            log.info("agent %s registered from %s (%d cpus, %d gpus, %d replica(s) running)",
                     msg.agent_id, msg.host, msg.capacity.cpus, len(msg.capacity.gpus), len(msg.replicas))
            self.state.register_agent(msg, now)
            self._reply(peer, ControlReply(True))
            if not self.recovering:
                self.state.reconcile(now)
            self._send_assignment(peer, msg.agent_id)
        elif isinstance(msg, AgentLeaving):  # no reply: the agent is shutting down
            self.state.agent_left(msg.agent_id, msg.reason)
        elif isinstance(msg, HeadHello):
            self._reply(peer, HeadInfo(PROTOCOL_VERSION, self.tables.epoch, self.publish_endpoint))
        elif isinstance(msg, ScaleDemand):  # no reply: the proxy resends while its requests wait
            if msg.deployment in self.state.deployments:
                self.demand.note(peer, msg.deployment, msg.waiting, now)
        elif isinstance(msg, SnapshotRequest):
            if self.recovering or self.tables.current is None:
                self._reply(peer, ControlReply(False, "recovering", "head is starting; retry shortly"))
            else:
                self._reply(peer, self.tables.current)
        elif isinstance(msg, (StatusRequest, DeployRequest, ScaleRequest, DeleteRequest)):
            if not token_matches(self.admin_token, msg.token):
                log.warning("refused %s: bad or missing admin token", type(msg).__name__)
                self._reply(peer, ControlReply(False, "unauthorized", WRONG_TOKEN if msg.token else UNAUTHORIZED))
            else:
                self._reply(peer, self._admin(msg, now))
        else:
            self._reply(peer, ControlReply(False, "unexpected", "unexpected %s" % type(msg).__name__))

    def _seed(self, seed: tuple[DeploymentSpec, ...], reset: bool) -> None:
        """The config file seeds deployments into a new state only; on later starts the stored ones
        (what deploy/scale set) win and each difference from the file is logged."""
        if not seed and not reset:
            return
        if reset or not self.store.seeded():
            wanted = {spec.name for spec in seed}
            for name in [n for n in self.state.deployments if n not in wanted]:
                self.store.delete(name)
                self.state.delete_deployment(name)
                log.info("[startup] deployment %s deleted (--reset-deployments: not in the config)", name)
            for spec in seed:
                self._put(spec)
            self.store.mark_seeded()
            return
        for spec in seed:
            have = self.state.deployments.get(spec.name)
            if have is None:
                log.info("[startup] deployment %s is in the config but not in the state (deleted); keeping "
                         "the state (--reset-deployments to take the file's)", spec.name)
            elif have != spec:
                mine, theirs = have.to_dict(), spec.to_dict()
                diff = ", ".join("%s %s (file: %s)" % (k, json.dumps(mine[k]), json.dumps(theirs[k]))
                                 for k in sorted(mine) if mine[k] != theirs[k])
                log.info("[startup] deployment %s differs from the config: %s; keeping the state "
                         "(--reset-deployments to take the file's)", spec.name, diff)
        extra = sorted(set(self.state.deployments) - {spec.name for spec in seed})
        if extra:
            log.info("[startup] deployment(s) %s not in the config (added by deploy); keeping them", extra)

    # ------------------------------------------------------------------ admin commands

    def _put(self, spec: DeploymentSpec) -> tuple[str, int]:
        result, generation = self.state.put_deployment(spec)
        if result != "unchanged":
            self.store.put(spec, generation)  # on disk before anyone is told
            log.info("deployment %s %s (generation %d, %d replica(s))", spec.name, result, generation,
                     spec.replicas)
        return result, generation

    def _admin(self, msg: object, now: float) -> object:
        if isinstance(msg, StatusRequest):
            deployments, agents = self.state.status(now, time.time())
            self.metrics.enrich_status(self.state, deployments, agents)
            for d in deployments:
                d.autoscale = self.autoscale_status(d.name)
            return StatusReply(self.tables.epoch, self.tables.version, deployments, agents)
        if isinstance(msg, DeployRequest):
            try:
                spec = parse_deployment(msg.spec, "spec")
            except ValueError as exc:
                return ControlReply(False, "invalid_spec", str(exc))
            refused = self._unplaceable(spec)
            if refused is not None:
                return refused
            result, generation = self._put(spec)
        elif isinstance(msg, ScaleRequest):
            old = self.state.deployments.get(msg.name)
            if old is None:
                return ControlReply(False, "not_found", "no deployment named %r" % msg.name)
            try:
                check_replicas(msg.replicas)
            except ValueError as exc:
                return ControlReply(False, "invalid_spec", str(exc))
            if old.autoscaling is not None:
                return ControlReply(False, "autoscaled", "%s is autoscaled between %d and %d replicas; change "
                                    "autoscaling.min_replicas/max_replicas with deploy (or remove autoscaling)"
                                    % (msg.name, old.autoscaling.min_replicas, old.autoscaling.max_replicas))
            spec = dataclasses.replace(old, replicas=msg.replicas)
            refused = self._unplaceable(spec)
            if refused is not None:
                return refused
            result, generation = self._put(spec)
        else:
            assert isinstance(msg, DeleteRequest)
            if msg.name not in self.state.deployments:
                return ControlReply(True, data={"result": "absent"})  # idempotent
            self.store.delete(msg.name)
            self.state.delete_deployment(msg.name)
            log.info("deployment %s deleted", msg.name)
            result, generation = "deleted", 0
        self._housekeeping()
        return ControlReply(True, data={"result": result, "generation": generation})

    def _unplaceable(self, spec: DeploymentSpec) -> Optional[ControlReply]:
        """Refuse a change whose replicas cannot all be placed on the agents we know (nothing is
        changed then). Not judged while recovering or before any agent registered."""
        old = self.state.deployments.get(spec.name)
        if self.recovering or (old is not None and old == spec) or (
                old is not None and old.same_replicas_as(spec) and spec.replicas <= old.replicas):
            return None
        why = self.state.why_unplaceable(spec)
        if not why:
            return None
        log.warning("refused %s: %s", spec.name, why)
        return ControlReply(False, "unplaceable", "%s; nothing changed (free capacity, lower replicas or "
                                                  "cpus/gpus/memory)" % why)

    def _autoscale(self, now: float) -> None:
        """Apply each autoscaled deployment's decision like `tokenrelay scale` would (persisted), never
        beyond what can be placed."""
        for name in [n for n in self.scalers if n not in self.state.deployments]:
            del self.scalers[name]
        waiting = self.demand.waiting(now)
        for dep in list(self.state.deployments.values()):
            cfg = dep.autoscaling
            if cfg is None:
                self.scalers.pop(dep.name, None)
                continue
            scaler = self.scalers.get(dep.name)
            if scaler is None or scaler.config != cfg:
                scaler = self.scalers[dep.name] = Autoscaler(cfg)
            ongoing, ready, starting = self.state.load_of(dep.name)

            def fits(n: int, dep: DeploymentSpec = dep) -> bool:
                return not self.state.why_unplaceable(dataclasses.replace(dep, replicas=n))
            d = scaler.decide(now, dep.replicas, ongoing, ready, starting,
                              failing=dep.name in self.state.healer.failures, fits=fits,
                              waiting=waiting.get(dep.name, 0) if ready == 0 else 0,
                              ttft_p90=self.state.ttft_p90_of(dep.name))
            if d.replicas != dep.replicas:
                log.info("[autoscale] %s: %d -> %d replica(s): %s", dep.name, dep.replicas, d.replicas, d.reason)
                self._put(dataclasses.replace(dep, replicas=d.replicas))

    def autoscale_status(self, name: str) -> Optional[AutoscaleStatus]:
        scaler = self.scalers.get(name)
        d: Optional[Decision] = scaler.last if scaler else None
        return None if d is None else AutoscaleStatus(d.replicas, d.wanted, d.reason)

    def _reply(self, peer: bytes, msg: object) -> None:
        try:
            frames = encode(msg)
        except (OverflowError, TypeError, ValueError, ProtocolError) as exc:  # a bug of ours: say so rather
            # than leave the peer waiting (msgspec: OverflowError for a huge int, TypeError for a set or a Path)
            log.error("cannot encode a %s for %s: %s", type(msg).__name__, loggable_identity(peer), exc)
            frames = encode(ControlReply(False, "internal", "the head could not encode its %s: %s"
                                         % (type(msg).__name__, exc)))
        try:
            self._control.send_multipart([peer] + frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("control reply to %s dropped (peer not reading)", loggable_identity(peer))

    def _send_assignment(self, peer: bytes, agent_id: str) -> None:
        self._reply(peer, Assignment(self.tables.epoch, self.tables.version,
                                     self.state.assignment_for(agent_id)))

    # ------------------------------------------------------------------ periodic work

    def _housekeeping(self) -> None:
        now = self.clock()
        started = time.perf_counter()
        try:
            if self._pub is None:
                self._rebind_pub(now)
            self._check_revocations(now)
            self.state.expire_agents(now)
            if not self.recovering:  # let every agent re-register (and report) before placing anything
                self.state.reconcile(now)
                self._autoscale(now)
        except Exception:
            log.exception("reconcile pass failed; going on")
        self.reconcile_seconds = time.perf_counter() - started
        self.metrics.observe_reconcile(self.reconcile_seconds)
        self.metrics.update(self, now)
        if self.recovering:
            return  # never publish a table that drops replicas we have not heard from yet
        table = self.tables.update(self.state.routes(), now, time.time()) if self._pub is not None else None
        if table is not None and self._pub is not None:
            try:
                self._pub.send_multipart([TABLE_TOPIC] + encode(table), zmq.NOBLOCK)
            except zmq.Again:
                pass
