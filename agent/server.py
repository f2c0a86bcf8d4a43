"""The agent's reactor: a poll loop that keeps this host's replicas as the head wants them.

Runs in the agent process, one thread. Owns two sockets, used only from `Agent.run`:
- head DEALER (connects `config.head`): AgentRegister, then AgentHeartbeat every interval and at once
  on any replica state change; the head answers each with our full Assignment. AgentLeaving when an
  orderly shutdown starts (not with --on-stop leave, where the replicas stay for the next agent). No answer for
  `head_timeout`: the socket is recreated and we register again (Lazy Pirate), reporting the replicas
  we run so a restarted head adopts them instead of restarting them.
- replica ROUTER (binds `config.replica_endpoint`): our replicas' ReplicaHello/ReplicaStatus/ReplicaDead.
With a key directory (runtime.curve) the head DEALER is a CURVE client with this agent's key, and the
replica ROUTER a CURVE server that admits only that same key (our replicas connect with it): a ZAP thread
on our context decides, and counts refusals in tokenrelay_agent_auth_refused_total.
Never blocks: process stops are two-phase (agent.processes), sends are non-blocking.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import psutil
import zmq

from agent.config import AgentConfig
from agent.devices import DeviceAllocator, devices_for, discover_gpus, host_cpu_cores, stopping_holders
from agent.lifecycle import ReplicaRecord
from agent.metrics import AgentMetrics
from agent.processes import AdoptedProcess, ReplicaProcess
from agent.repin import RepinPlan
from model_proc.config import METRICS_HOST_ENV
from runtime import authz, curve, parent_guard
from runtime.capacity import Demand, Host, demand_of
from runtime.curve import AGENT_KEY_ENV, CURVE_ENV, INSECURE_ENV
from runtime.keyring import Registry, identity, server_public
from runtime.zap import RefusalLog, ZapHandler
from runtime.protocol import (
    PROTOCOL_VERSION, AgentHeartbeat, AgentLeaving, AgentRegister, Assignment, Capacity, ControlReply, ProtocolError,
    ReplicaDead, ReplicaHello, ReplicaSpec, ReplicaState, ReplicaStatus, decode_frames, encode,
)

log = logging.getLogger(__name__)

TICK = 0.05
REFUSAL_LOG_EVERY = 60.0  # seconds between log lines of one head refusal that repeats
ADOPT_WAIT = 1.0  # adopt mode: listen this long for surviving replicas (hello + status) before registering


def host_capacity() -> Capacity:
    return Capacity(cpus=len(host_cpu_cores()), memory_bytes=psutil.virtual_memory().total, gpus=discover_gpus())


class Agent:
    def __init__(self, config: AgentConfig, clock: Callable[[], float] = time.monotonic,
                 ctx: Optional[zmq.Context] = None) -> None:
        self.config = config
        self.clock = clock
        self._ctx = ctx or zmq.Context.instance()
        self.records: dict[str, ReplicaRecord] = {}
        self.procs: dict[str, ReplicaProcess | AdoptedProcess] = {}
        self._stopping: dict[str, ReplicaProcess | AdoptedProcess] = {}
        self._shutdown = False
        self._head: Optional[zmq.Socket] = None
        self._registered = False
        self._seq = 0
        self._last_head_reply = 0.0
        self._next_heartbeat = 0.0
        self._dirty = False
        self._wall_offset = time.time() - clock()
        self.capacity = host_capacity()
        self.devices = DeviceAllocator([g.index for g in self.capacity.gpus], host_cpu_cores(),
                                       config.cpu_kvcache_gib)
        self._keys = Path(config.curve_dir) if config.curve_dir else None
        self._identity = identity(self._keys, "agent", config.agent_id) if self._keys else None
        self._head_public = server_public(self._keys, "head") if self._keys else b""
        self.host = Host(self.capacity.cpus, self.capacity.memory_bytes, len(self.capacity.gpus))
        self._repins = RepinPlan()  # replicas to restart on fewer cores (agent.repin)
        self.metrics = AgentMetrics(config.metrics_port)
        self._refusal_log = RefusalLog(log)
        self._last_refusal: tuple[str, str] = ("", "")  # the head's last refusal, and when to log it again
        self._refusal_repeat_at = 0.0

    def stop(self) -> None:
        self._shutdown = True

    def _refused(self, role: str, reason: str, who: str) -> None:
        self._refusal_log(who, reason)
        self.metrics.auth_refused.labels(role, reason).inc()

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        cfg = self.config
        self._zap: Optional[ZapHandler] = None
        self._replicas = self._ctx.socket(zmq.ROUTER)
        self._replicas.setsockopt(zmq.LINGER, 0)
        if self._keys is not None and self._identity is not None:
            self._zap = ZapHandler(self._ctx, Registry(self._keys), self._refused, own=self._identity).start()
            curve.serve(self._replicas, (self._identity.public, self._identity.secret), authz.AGENT_REPLICAS)
        try:
            self._replicas.bind(cfg.replica_endpoint)
            self.replica_endpoint = self._replicas.getsockopt_string(zmq.LAST_ENDPOINT)
            self.metrics.start(cfg.metrics_host)
        except (zmq.ZMQError, OSError) as exc:  # a port in use: a traceback and exit 1, restarted in a loop
            log.error("[startup] cannot listen (--replica-endpoint %s, --metrics-host %s --metrics-port %d): %s",
                      cfg.replica_endpoint, cfg.metrics_host, cfg.metrics_port, exc)
            self._replicas.close(0)
            if self._zap is not None:
                self._zap.stop()
            self.metrics.close()
            return 2  # a bad command line: `tokenrelay up` stops the stack instead of restarting the agent
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        log.info("[startup] agent %s: head %s, replicas report to %s, %d cpus, %d gpus, %s", cfg.agent_id,
                 cfg.head, self.replica_endpoint, self.capacity.cpus, len(self.capacity.gpus),
                 curve.describe(self._keys))
        leaving = False  # AgentLeaving sent: the head socket lingers so that it leaves
        try:
            if cfg.adopt:
                self._wait_for_survivors()
            self._connect_head()
            while not self._shutdown:
                self._step()
                if cfg.parent_pid is not None and not parent_guard.parent_alive(cfg.parent_pid):
                    log.error("[shutdown] parent %d is gone", cfg.parent_pid)
                    break
            if cfg.leaves_replicas:
                log.info("[shutdown] adopt mode: leaving %d replica(s) running for the next agent",
                         len(self.procs))
                self.procs.clear()
            else:
                # said first: the head takes the replicas out of routing now, as a planned departure,
                # while the engines shut down (which can outlast the head's agent timeout)
                self._send_head(AgentLeaving(cfg.agent_id, "shutting down"))
                leaving = True
                self._stop_all()
        finally:
            for proc in list(self.procs.values()) + list(self._stopping.values()):
                proc.kill_now()
            self._replicas.close(0)
            if self._zap is not None:
                self._zap.stop()
            self.metrics.close()
            if self._head is not None:
                # an orderly stop said AgentLeaving: give it up to a second to leave (LINGER is 0 otherwise)
                self._head.close(linger=1000 if leaving else 0)
            log.info("[shutdown] agent stopped")
        return 0

    def _wait_for_survivors(self) -> None:
        """Adopt mode: replicas of a previous agent reconnect to our fixed endpoint and say hello."""
        deadline = self.clock() + ADOPT_WAIT
        while self.clock() < deadline and not self._shutdown:
            if self._replicas.poll(TICK * 1000):
                self._drain(self._replicas, self._on_replica_frames)
        if self.records:
            log.info("[startup] adopted %d running replica(s): %s", len(self.records), sorted(self.records))

    def _adopt(self, hello: ReplicaHello, now: float) -> None:
        proc = AdoptedProcess.verified(hello.pid, hello.replica_id)
        if proc is None:
            log.warning("not adopting replica %s: pid %d is not its process", hello.replica_id, hello.pid)
            return
        spec = ReplicaSpec(hello.replica_id, hello.deployment, "", "", generation=hello.generation)
        rec = ReplicaRecord(spec, self.config.policy)
        rec.launched(hello.pid, now)
        rec.hello(hello.endpoint, now)
        self.records[hello.replica_id] = rec
        self.procs[hello.replica_id] = proc
        self.devices.adopt(hello.replica_id, proc.environ())  # its devices stay its own until it stops
        self._dirty = True
        log.info("adopted replica %s of %s (pid %d, %s)", hello.replica_id, hello.deployment, hello.pid,
                 hello.endpoint)

    def _step(self) -> None:
        poller = zmq.Poller()
        head = self._head
        poller.register(self._replicas, zmq.POLLIN)
        if head is not None:
            poller.register(head, zmq.POLLIN)
        events = dict(poller.poll(int(TICK * 1000)))
        now = self.clock()
        try:
            if self._replicas in events:
                self._drain(self._replicas, self._on_replica_frames)
            if head is not None and head in events:
                self._drain(head, self._on_head_frames)
            self._supervise(now)
            self.metrics.update(now, self.records, self._registered)
            self._talk_to_head(now)
        except Exception:
            log.exception("agent step failed; going on")

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[bytes]], None]) -> None:
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    # ------------------------------------------------------------------ head

    def _connect_head(self) -> None:
        if self._head is not None:
            self._head.close(0)
        self._head = self._ctx.socket(zmq.DEALER)
        self._head.setsockopt(zmq.LINGER, 0)
        self._head.setsockopt(zmq.SNDHWM, 100)
        if self._identity is not None:
            curve.connect(self._head, self._identity, self._head_public)
        self._head.connect(self.config.head)
        self._registered = False
        self._last_head_reply = self.clock()
        self._send_head(AgentRegister(PROTOCOL_VERSION, self.config.agent_id, self.config.host,
                                      self.capacity, self.config.labels, self._reports(),
                                      metrics_endpoint=self.metrics.address))

    def _send_head(self, msg: object) -> None:
        try:
            self._head.send_multipart(encode(msg), zmq.NOBLOCK)  # type: ignore[union-attr]
        except zmq.Again:
            pass  # head unreachable; the reconnect logic deals with it

    def _talk_to_head(self, now: float) -> None:
        if now - self._last_head_reply > self.config.head_timeout:
            log.warning("[failover] no answer from head %s for %.1fs; reconnecting", self.config.head,
                        now - self._last_head_reply)
            self._connect_head()
            return
        if self._dirty or now >= self._next_heartbeat:
            self._dirty = False
            self._next_heartbeat = now + self.config.heartbeat_interval
            self._seq += 1
            self._send_head(AgentHeartbeat(self.config.agent_id, self._seq, self._reports(),
                                           usage=self.metrics.usage()))

    def _on_head_frames(self, frames: list[bytes]) -> None:
        try:
            msg = decode_frames(frames)
        except ProtocolError as exc:
            log.warning("bad message from head: %s", exc)
            return
        self._last_head_reply = self.clock()
        if isinstance(msg, Assignment):
            self._registered = True
            self._apply(msg.replicas)
        elif isinstance(msg, ControlReply):
            if msg.ok:
                self._registered = True
                self._last_refusal = ("", "")  # a refusal after this one is news: logged at once
            elif msg.code == "unknown_agent":
                log.info("[failover] head does not know us (restarted?); registering again")
                self._send_head(AgentRegister(PROTOCOL_VERSION, self.config.agent_id, self.config.host,
                                              self.capacity, self.config.labels, self._reports(),
                                              metrics_endpoint=self.metrics.address))
            elif (msg.code, msg.message) != self._last_refusal or self.clock() >= self._refusal_repeat_at:
                # once a minute while it repeats: a revoked agent hears it on every heartbeat (2 a second)
                log.error("head refused: %s %s", msg.code, msg.message)
                self._last_refusal, self._refusal_repeat_at = (msg.code, msg.message), self.clock() + REFUSAL_LOG_EVERY

    def _reports(self) -> list:
        return [self.metrics.report(r.report(self._wall_offset)) for r in self.records.values()]

    # ------------------------------------------------------------------ replicas

    def _apply(self, specs: list[ReplicaSpec]) -> None:
        wanted = {s.replica_id: s for s in specs}
        for replica_id in list(self.records):
            if replica_id not in wanted:
                log.info("replica %s no longer assigned; stopping", replica_id)
                self._stop_replica(replica_id)
        for replica_id, spec in wanted.items():
            rec = self.records.get(replica_id)
            if rec is not None and not rec.spec.engine:  # adopted: now we know its full spec
                rec.spec = spec
            if replica_id not in self.records:
                log.info("assigned replica %s (%s, engine %s)", replica_id, spec.deployment, spec.engine)
                self.records[replica_id] = ReplicaRecord(spec, self.config.policy)
                self._dirty = True

    def _stop_replica(self, replica_id: str, drain: bool = True) -> None:
        rec = self.records.get(replica_id)
        proc = self.procs.pop(replica_id, None)
        if proc is not None:
            seconds = rec.spec.drain_seconds if rec is not None and drain else 0.0
            proc.begin_stop(seconds + self.config.stop_grace, self.clock())
            self._stopping[replica_id] = proc
        self.records.pop(replica_id, None)
        if replica_id in self._stopping:  # its process holds its GPUs (or cores) until it is gone
            self.devices.retire(replica_id)
        else:
            self.devices.release(replica_id)
        self._repins.forget(replica_id)
        self._dirty = True

    def _supervise(self, now: float) -> None:
        for replica_id, rec in self.records.items():
            proc = self.procs.get(replica_id)
            if proc is not None:
                code = proc.poll()
                if code is not None:
                    if proc.kill_group():  # its engine processes must not outlive it
                        log.warning("[failover] replica %s left processes in its group; killed them", replica_id)
                    del self.procs[replica_id]
                    self.devices.release(replica_id)
                    was = rec.state
                    rec.exited(code, now)
                    log.warning("[failover] replica %s (pid %d) exited with %d while %s: %s",
                                replica_id, proc.pid, code, was.value, rec.message)
                    self._dirty = True
                    continue
                changed, kill = rec.check(now)
                if changed:
                    log.warning("[failover] replica %s unhealthy: %s", replica_id, rec.message)
                    self._dirty = True
                if kill:
                    log.warning("[restart] replica %s: %s; stopping it", replica_id, rec.message)
                    proc.begin_stop(self.config.stop_grace, now)
            elif rec.should_start(now) and not self._waits_for_devices(rec):
                self._start(rec, now)
        for replica_id, proc in list(self._stopping.items()):
            if proc.poll_stop(now):
                del self._stopping[replica_id]
                self.devices.release(replica_id)
                log.info("replica %s stopped", replica_id)
                restarting = self.records.get(replica_id)
                if restarting is not None:
                    restarting.stopped_for_restart(now)  # a re-pin: start again on its new cores
        self._repin(now)

    def _repin(self, now: float) -> None:
        """Restart, one at a time, each replica still running on cores a newer one was given, once
        another replica of its deployment is ready (agent.repin)."""
        for replica_id in self._repins.due(now, self._running()):
            proc, rec = self.procs.pop(replica_id), self.records[replica_id]
            proc.begin_stop(rec.spec.drain_seconds + self.config.stop_grace, now)
            self._stopping[replica_id] = proc
            self.devices.retire(replica_id)  # it starts again on its new share once this process is gone
        picked = self._repins.pick(now, self.records, self._running())
        if picked is not None:
            replica_id, ready = picked
            self.records[replica_id].planned_restart("restarting on fewer cores to make room for a new replica")
            self._dirty = True
            log.info("[restart] replica %s: restarting on fewer cores (%s is ready)", replica_id, ready)

    def _running(self) -> set[str]:
        return {replica_id for replica_id in self.procs if replica_id in self.records}

    def _start(self, rec: ReplicaRecord, now: float) -> None:
        try:
            spec, env = self._devices_for(rec.spec)
        except ValueError as exc:
            rec.state = ReplicaState.FAILED
            rec.message = "cannot place on this host: %s" % exc
            log.error("replica %s: %s", rec.replica_id, rec.message)
            self._dirty = True
            return
        log_path = Path(self.config.replica_log_dir) / ("%s.log" % rec.replica_id) \
            if self.config.replica_log_dir else None
        try:
            proc = ReplicaProcess(spec, self.config.host, self.replica_endpoint, env, guard=not self.config.adopt,
                                  log_path=log_path, stack_pid=self.config.parent_pid)
        except OSError as exc:
            log.error("cannot start replica %s: %s", rec.replica_id, exc)
            rec.exited(1, now)
            return
        self.procs[rec.replica_id] = proc
        rec.launched(proc.pid, now)
        self._dirty = True
        log.info("[startup] replica %s started, pid %d%s", rec.replica_id, proc.pid,
                 ", log %s" % log_path if log_path else "")

    def _waits_for_devices(self, rec: ReplicaRecord) -> bool:
        """True while a stopping process (its own previous one, or another replica's) still holds devices
        this replica would get: the head unassigns a replica before its process has drained and exited,
        and may place the next one there by then."""
        holders = [rec.replica_id] if rec.replica_id in self._stopping else \
            stopping_holders(self.devices, self._demands(), rec.spec)
        if rec.wait_for_devices(holders):
            if holders:
                log.info("replica %s: %s", rec.replica_id, rec.message)
            self._dirty = True
        return bool(holders)

    def _demands(self) -> dict[str, Demand]:
        return {rid: demand_of(r.spec.engine, r.spec.gpus, r.spec.cpus, r.spec.memory_bytes)
                for rid, r in self.records.items()}

    def _devices_for(self, spec: ReplicaSpec) -> tuple[ReplicaSpec, dict[str, str]]:
        """The replica's devices and environment (agent.devices.devices_for); replicas left holding some
        of its cores are re-pinned by `_repin`."""
        spec, env, gave_up = devices_for(self.devices, self.host, self._demands(), spec)
        self._repins.want(gave_up)
        env.update({INSECURE_ENV: "1"} if self._keys is None else {
            CURVE_ENV: str(self._keys), INSECURE_ENV: "0", AGENT_KEY_ENV: self.config.agent_id})
        env[METRICS_HOST_ENV] = self.config.metrics_host
        return spec, env

    def _on_replica_frames(self, frames: list[bytes]) -> None:
        try:
            msg = decode_frames(frames)
        except ProtocolError as exc:
            log.warning("bad message from a replica: %s", exc)
            return
        now = self.clock()
        rec = self.records.get(getattr(msg, "replica_id", ""))
        if rec is None:
            if self.config.adopt and isinstance(msg, ReplicaHello) and msg.deployment \
                    and msg.replica_id not in self._stopping:
                self._adopt(msg, now)
            return  # otherwise a replica we are stopping, or a stranger
        if isinstance(msg, ReplicaStatus):
            if rec.status(msg, now):
                log.info("replica %s is %s", rec.replica_id, rec.state.value)
                self._dirty = True
        elif isinstance(msg, ReplicaHello):
            rec.hello(msg.endpoint, now)
            self.metrics.hello(msg)
            self._dirty = True
        elif isinstance(msg, ReplicaDead):
            log.error("[failover] replica %s says it is dead: %s", rec.replica_id, msg.reason)
            rec.message = msg.reason
            if rec.state == ReplicaState.READY:
                rec.state = ReplicaState.UNHEALTHY
            self._dirty = True

    def _stop_all(self) -> None:
        """Graceful shutdown: stop every replica tree, waiting at most stop_grace (+1 s for SIGKILL)."""
        for replica_id in list(self.records):
            self._stop_replica(replica_id, drain=False)
        deadline = self.clock() + self.config.stop_grace + 1.0
        while self._stopping and self.clock() < deadline:
            for replica_id, proc in list(self._stopping.items()):
                if proc.poll_stop(self.clock()):
                    del self._stopping[replica_id]
            time.sleep(0.05)  # waiting for other processes to exit; nothing else to do
        log.info("[shutdown] all replicas stopped")

