"""Configuration of the agent process, built from the command line.

Runs in the agent; owns no socket.
"""
from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass, field
from typing import Optional

from agent.lifecycle import RestartPolicy
from runtime.curve import insecure_from_env


@dataclass(frozen=True)
class AgentConfig:
    head: str = "tcp://127.0.0.1:7100"
    host: str = "127.0.0.1"  # address replicas bind on; proxies must be able to reach it
    agent_id: str = field(default_factory=socket.gethostname)
    replica_endpoint: str = "tcp://127.0.0.1:*"  # where this host's replicas report to the agent
    heartbeat_interval: float = 0.5
    head_timeout: float = 3.0  # no answer from the head this long: reconnect and register again
    # SIGTERM -> SIGKILL for a replica's process tree (after its drain): vLLM's own engine shutdown
    # took over 5 s on 2 loaded cores, so 10 s lets it finish instead of being killed
    stop_grace: float = 10.0
    labels: dict[str, str] = field(default_factory=dict)
    policy: RestartPolicy = RestartPolicy()
    parent_pid: Optional[int] = None
    curve_dir: Optional[str] = None
    cpu_kvcache_gib: Optional[int] = None  # VLLM_CPU_KVCACHE_SPACE for CPU replicas
    metrics_port: int = 0  # Prometheus /metrics (agent.metrics); 0 picks a free port, < 0: off
    metrics_host: str = "127.0.0.1"  # where the agent's and its replicas' /metrics bind: loopback unless set
    adopt: bool = False  # replicas outlive the agent; a restarted agent adopts them (fixed replica endpoint)
    log_level: str = "INFO"
    insecure: bool = False  # --insecure: plain sockets, explicitly asked for
    replica_log_dir: Optional[str] = None  # each replica's output (engine logs) to <dir>/<replica>.log

    def __post_init__(self) -> None:
        if not self.head.startswith(("tcp://", "ipc://")):
            raise ValueError("--head must be a tcp:// or ipc:// endpoint, got %r" % self.head)
        if not 0.05 <= self.heartbeat_interval <= 10:
            raise ValueError("--heartbeat-interval must be between 0.05 and 10 seconds")
        if self.stop_grace < 0:
            raise ValueError("--stop-grace must be >= 0")
        if self.adopt and self.replica_endpoint.endswith(":*"):
            raise ValueError("--adopt needs a fixed --replica-endpoint (e.g. tcp://127.0.0.1:7200 or "
                             "ipc:///run/tokenrelay/agent.sock) so replicas find the restarted agent")


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError("--label must look like key=value, got %r" % item)
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent",
                                description="tokenrelay agent: runs and supervises this host's replicas.")
    p.add_argument("--head", default=AgentConfig.head, help="the head's control endpoint")
    p.add_argument("--host", default=AgentConfig.host,
                   help="address this host's replicas bind on (reachable by proxies)")
    p.add_argument("--agent-id", default=None, help="stable id of this agent (default: hostname)")
    p.add_argument("--replica-endpoint", default=AgentConfig.replica_endpoint,
                   help="endpoint the agent binds for its replicas' status reports")
    p.add_argument("--heartbeat-interval", type=float, default=AgentConfig.heartbeat_interval)
    p.add_argument("--stop-grace", type=float, default=AgentConfig.stop_grace,
                   help="seconds between SIGTERM and SIGKILL when stopping a replica")
    p.add_argument("--liveness-timeout", type=float, default=RestartPolicy.liveness_timeout,
                   help="seconds without a replica status before it is unhealthy")
    p.add_argument("--stuck-timeout", type=float, default=RestartPolicy.stuck_timeout,
                   help="seconds with requests pending and no engine progress before unhealthy")
    p.add_argument("--label", action="append", default=[], help="host label key=value (repeatable)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    p.add_argument("--curve-dir", default=None,
                   help="CURVE key directory (runtime.keyring) with this agent's key agent-ID.key_secret "
                        "(default $TOKENRELAY_CURVE_DIR, else STATE_DIR/keys)")
    p.add_argument("--insecure", action="store_true",
                   help="plain sockets, no authentication (benchmarks and debugging only; logged loudly); "
                        "also $TOKENRELAY_INSECURE=1")
    p.add_argument("--adopt", action="store_true",
                   help="let replicas outlive the agent and adopt them when it restarts "
                        "(needs a fixed --replica-endpoint); default: replicas exit with their agent")
    p.add_argument("--cpu-kvcache-gib", type=int, default=None,
                   help="KV cache GiB per CPU vLLM replica (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus /metrics HTTP port (0: a free one, -1: off)")
    p.add_argument("--metrics-host", default=AgentConfig.metrics_host,
                   help="address the agent's and its replicas' /metrics ports bind on (default loopback: "
                        "give this host's address for a Prometheus on another host)")
    p.add_argument("--replica-log-dir", default=None,
                   help="write each replica's output (its engine's logs) to DIR/<replica id>.log instead of "
                        "the agent's terminal")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(argv: Optional[list[str]] = None) -> AgentConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        policy = RestartPolicy(liveness_timeout=ns.liveness_timeout, stuck_timeout=ns.stuck_timeout)
        kwargs = dict(head=ns.head, host=ns.host, replica_endpoint=ns.replica_endpoint,
                      heartbeat_interval=ns.heartbeat_interval, stop_grace=ns.stop_grace,
                      labels=_labels(ns.label), policy=policy, parent_pid=ns.parent_pid,
                      curve_dir=ns.curve_dir, cpu_kvcache_gib=ns.cpu_kvcache_gib, adopt=ns.adopt,
                      metrics_port=ns.metrics_port, metrics_host=ns.metrics_host, log_level=ns.log_level,
                      insecure=ns.insecure or insecure_from_env(), replica_log_dir=ns.replica_log_dir)
        if ns.agent_id:
            kwargs["agent_id"] = ns.agent_id
        return AgentConfig(**kwargs)
    except ValueError as exc:
        parser.error(str(exc))
        raise
