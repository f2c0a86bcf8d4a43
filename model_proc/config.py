"""Configuration of one replica process (model_proc), built from the command line.

Runs in model_proc; owns no socket.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from runtime.curve import AGENT_KEY_ENV, insecure_from_env

# Exit codes the agent classifies (agent.lifecycle): a load error will not be cured by a restart.
EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_LOAD_ERROR = 3
EXIT_ENGINE_DIED = 4

EVENT_LOOPS = ("auto", "uvloop", "asyncio")
METRICS_HOST_ENV = "TOKENRELAY_METRICS_HOST"  # the agent passes its --metrics-host to its replicas


@dataclass(frozen=True)
class ReplicaConfig:
    replica_id: str
    engine: str
    model: str
    engine_args: dict[str, Any] = field(default_factory=dict)
    bind: str = "tcp://127.0.0.1:*"
    agent: Optional[str] = None
    status_interval: float = 0.25
    parent_pid: Optional[int] = None
    stack_pid: Optional[int] = None  # outlive the agent (adoption), not this process (the stack's launcher)
    drain_seconds: float = 3.0
    deployment: str = ""
    generation: int = 0
    metrics_port: int = 0  # Prometheus /metrics; 0 picks a free port, < 0 turns it off
    metrics_host: str = "127.0.0.1"  # where it binds: loopback unless configured
    log_level: str = "INFO"
    event_loop: str = "auto"  # auto (uvloop when installed) | uvloop | asyncio
    curve_dir: Optional[str] = None  # CURVE keys (runtime.keyring); None here: plain (__main__ resolves it)
    agent_key: Optional[str] = None  # the agent's id: its key is the one we connect to it with
    insecure: bool = False  # --insecure: plain sockets, explicitly asked for

    def __post_init__(self) -> None:
        if not self.replica_id:
            raise ValueError("--replica-id must not be empty")
        if not self.bind.startswith(("tcp://", "ipc://")):
            raise ValueError("--bind must be a tcp:// or ipc:// endpoint, got %r" % self.bind)
        if not 0.01 <= self.status_interval <= 5:
            raise ValueError("--status-interval must be between 0.01 and 5 seconds")
        if self.drain_seconds < 0:
            raise ValueError("--drain-seconds must be >= 0")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError("--event-loop must be one of %s, got %r"
                             % (", ".join(EVENT_LOOPS), self.event_loop))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model_proc",
        description="One tokenrelay replica: binds a ZeroMQ ROUTER for proxies and runs an engine. "
                    "Normally started by the agent.")
    p.add_argument("--replica-id", required=True, help="unique id of this replica")
    p.add_argument("--engine", default="mock", help="engine: mock (fake text, for tests) or vllm")
    p.add_argument("--model", default="mock", help="model path or name passed to the engine")
    p.add_argument("--engine-args", default="{}", help="engine arguments as a JSON object")
    p.add_argument("--bind", default="tcp://127.0.0.1:*",
                   help="data endpoint proxies connect to (port * picks a free one)")
    p.add_argument("--agent", default=None, help="the agent's replica endpoint to report to")
    p.add_argument("--status-interval", type=float, default=0.25, help="seconds between status reports")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process (the agent) dies; omit to allow adoption")
    p.add_argument("--stack-pid", type=int, default=None,
                   help="with no --parent-pid: exit when this process is gone (the `tokenrelay up` "
                        "launcher, when its agent runs in adopt mode: a replica outlives its agent, not "
                        "its stack)")
    p.add_argument("--drain-seconds", type=float, default=3.0,
                   help="on SIGTERM, how long in-flight requests may finish")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus /metrics HTTP port (0: a free one, -1: off)")
    p.add_argument("--metrics-host", default=os.environ.get(METRICS_HOST_ENV) or "127.0.0.1",
                   help="address the /metrics port binds on (default $%s, set by the agent, else loopback)"
                        % METRICS_HOST_ENV)
    p.add_argument("--deployment", default="", help="deployment this replica belongs to (for adoption)")
    p.add_argument("--generation", type=int, default=0, help="the deployment's spec generation")
    p.add_argument("--event-loop", default="auto", choices=EVENT_LOOPS,
                   help="the replica's asyncio loop: auto (uvloop when installed), uvloop or asyncio")
    p.add_argument("--curve-dir", default=None,
                   help="CURVE key directory (default $TOKENRELAY_CURVE_DIR, else STATE_DIR/keys): the data "
                        "socket serves with replica.key_secret and admits proxy keys only")
    p.add_argument("--agent-key", default=os.environ.get(AGENT_KEY_ENV) or None,
                   help="id of the agent whose key (agent-ID.key_secret) we report to it with "
                        "(default $%s, set by the agent)" % AGENT_KEY_ENV)
    p.add_argument("--insecure", action="store_true",
                   help="plain sockets (benchmarks and debugging only; logged loudly); also $TOKENRELAY_INSECURE=1")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(argv: Optional[list[str]] = None) -> ReplicaConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        engine_args = json.loads(ns.engine_args)
        if not isinstance(engine_args, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        parser.error("--engine-args must be a JSON object: %s" % exc)
    try:
        return ReplicaConfig(
            replica_id=ns.replica_id, engine=ns.engine, model=ns.model, engine_args=engine_args,
            bind=ns.bind, agent=ns.agent, status_interval=ns.status_interval,
            parent_pid=ns.parent_pid, stack_pid=ns.stack_pid, drain_seconds=ns.drain_seconds, deployment=ns.deployment,
            generation=ns.generation, metrics_port=ns.metrics_port, metrics_host=ns.metrics_host,
            log_level=ns.log_level, event_loop=ns.event_loop, curve_dir=ns.curve_dir,
            agent_key=ns.agent_key, insecure=ns.insecure or insecure_from_env())
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable
