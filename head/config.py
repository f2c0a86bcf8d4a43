"""Configuration of the head process, built from the command line.

Runs in the head; owns no socket.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Optional

from runtime.curve import insecure_from_env


STACK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class HeadConfig:
    control: str = "tcp://127.0.0.1:7100"
    publish: str = "tcp://127.0.0.1:7101"
    config_file: Optional[str] = None
    agent_timeout: float = 3.0
    recovery_grace: float = 2.0
    republish_interval: float = 1.0
    state_dir: Optional[str] = None  # SQLite state and admin token; see runtime.credentials
    persist: bool = True
    parent_pid: Optional[int] = None
    curve_dir: Optional[str] = None  # CURVE keys (runtime.keyring); None here: plain (python -m head resolves it)
    metrics_port: int = 0  # Prometheus /metrics (head.metrics); 0 picks a free port, < 0 turns it off
    metrics_host: Optional[str] = None  # bind/advertise host for it; None: the control endpoint's host
    prometheus_sd_file: Optional[str] = None  # file_sd list of every process's metrics endpoint
    proxy_metrics: tuple[str, ...] = ()  # proxies' HOST:PORT listed in that file
    log_level: str = "INFO"
    insecure: bool = False  # --insecure: plain sockets, explicitly asked for
    stack: Optional[str] = None  # state of this stack apart: <state_dir>/stacks/<stack>/head.db
    reset_deployments: bool = False  # the config file's deployments replace the stored ones

    def __post_init__(self) -> None:
        if self.stack is not None and not STACK_NAME_RE.match(self.stack):
            raise ValueError("--stack must be 1-63 letters, digits, '.', '_' or '-', got %r" % self.stack)
        for name in ("control", "publish"):
            if not getattr(self, name).startswith(("tcp://", "ipc://")):
                raise ValueError("--%s must be a tcp:// or ipc:// endpoint" % name)
        if self.agent_timeout <= 0:
            raise ValueError("--agent-timeout must be > 0")
        if self.recovery_grace < 0:
            raise ValueError("--recovery-grace must be >= 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m head",
                                description="tokenrelay head: deployments, agents, routing table.")
    p.add_argument("--control", default=HeadConfig.control,
                   help="ROUTER endpoint agents, proxies and the CLI connect to")
    p.add_argument("--publish", default=HeadConfig.publish,
                   help="PUB endpoint routing tables are published on")
    p.add_argument("--config", dest="config_file", default=None,
                   help="stack config file whose deployments to serve (YAML or JSON)")
    p.add_argument("--agent-timeout", type=float, default=HeadConfig.agent_timeout,
                   help="seconds without a heartbeat before an agent's replicas leave routing")
    p.add_argument("--recovery-grace", type=float, default=HeadConfig.recovery_grace,
                   help="seconds after start to wait for agents before publishing tables")
    p.add_argument("--state-dir", default=None,
                   help="directory for head.db (deployments) and admin.token "
                        "(default $TOKENRELAY_STATE_DIR or ~/.local/state/tokenrelay)")
    p.add_argument("--no-persist", action="store_true", help="keep deployments in memory only")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    p.add_argument("--curve-dir", default=None,
                   help="CURVE key directory (runtime.keyring): encrypt and authenticate both sockets "
                        "(default $TOKENRELAY_CURVE_DIR, else STATE_DIR/keys)")
    p.add_argument("--insecure", action="store_true",
                   help="plain sockets, no authentication (benchmarks and debugging only; logged loudly); "
                        "also $TOKENRELAY_INSECURE=1")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus /metrics HTTP port (0: a free one, -1: off)")
    p.add_argument("--metrics-host", default=None,
                   help="host the metrics port binds and is advertised on (default: the --control host)")
    p.add_argument("--prometheus-sd-file", default=None,
                   help="keep a Prometheus file_sd JSON list of every process's metrics endpoint here")
    p.add_argument("--proxy-metrics", default="",
                   help="comma-separated HOST:PORT of proxies to list in the SD file (proxies that say "
                        "their address in HeadHello are added by themselves)")
    p.add_argument("--stack", default=None,
                   help="keep this stack's deployments apart, in <state dir>/stacks/NAME/head.db (the admin "
                        "token stays in the state directory); default: <state dir>/head.db")
    p.add_argument("--reset-deployments", action="store_true",
                   help="replace the stored deployments with the --config file's (default: the file seeds "
                        "only a new state; later starts keep what deploy/scale set)")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(argv: Optional[list[str]] = None) -> HeadConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return HeadConfig(control=ns.control, publish=ns.publish, config_file=ns.config_file,
                          agent_timeout=ns.agent_timeout, recovery_grace=ns.recovery_grace,
                          state_dir=ns.state_dir, persist=not ns.no_persist, parent_pid=ns.parent_pid,
                          curve_dir=ns.curve_dir, metrics_port=ns.metrics_port, metrics_host=ns.metrics_host,
                          prometheus_sd_file=ns.prometheus_sd_file,
                          proxy_metrics=tuple(p.strip() for p in ns.proxy_metrics.split(",") if p.strip()),
                          log_level=ns.log_level, insecure=ns.insecure or insecure_from_env(), stack=ns.stack,
                          reset_deployments=ns.reset_deployments)
    except ValueError as exc:
        parser.error(str(exc))
        raise
