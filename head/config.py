"""Configuration of the head process: one frozen dataclass from which its command line derives
(runtime.settings: each field's default and help live on the field).

Runs in the head; owns no socket. Command line over defaults: no environment variable stands in for an
option except TOKENRELAY_INSECURE for --insecure (runtime.curve); the state and key directory variables
used when --state-dir / --curve-dir are not given are declared in runtime.credentials and runtime.curve.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from runtime.curve import parse_config_with_insecure_env
from runtime.settings import setting


STACK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")  # \Z: "$" also matches before a final newline
PROG = "python -m head"
DESCRIPTION = "tokenrelay head: deployments, agents, routing table."


@dataclass(frozen=True)
class HeadConfig:
    control: str = setting("tcp://127.0.0.1:7100", help="ROUTER endpoint agents, proxies and the CLI connect to")
    publish: str = setting("tcp://127.0.0.1:7101", help="PUB endpoint routing tables are published on")
    config_file: Optional[str] = setting(None, flag="--config", metavar="FILE",
                                         help="stack config file whose deployments to serve (YAML or JSON)")
    agent_timeout: float = setting(3.0, help="seconds without a heartbeat before an agent's replicas leave routing")
    recovery_grace: float = setting(2.0, help="seconds after start to wait for agents before publishing tables")
    republish_interval: float = setting(1.0, help="seconds between publishes of an unchanged routing table",
                                        cli=False)
    state_dir: Optional[str] = setting(  # SQLite state and admin token; see runtime.credentials
        None, help="directory for head.db (deployments) and admin.token",
        default_help="$TOKENRELAY_STATE_DIR or ~/.local/state/tokenrelay")
    persist: bool = setting(True, help="keep deployments on disk (--no-persist: in memory only)")
    parent_pid: Optional[int] = setting(None, help="exit when this process dies")
    curve_dir: Optional[str] = setting(  # None here: plain (python -m head resolves it)
        None, help="CURVE key directory (runtime.keyring): encrypt and authenticate both sockets",
        default_help="$TOKENRELAY_CURVE_DIR, else STATE_DIR/keys")
    metrics_port: int = setting(0, help="Prometheus /metrics HTTP port (0: a free one, -1: off)")
    metrics_host: Optional[str] = setting(
        None, help="host the metrics port binds and is advertised on", default_help="the --control host")
    prometheus_sd_file: Optional[str] = setting(
        None, help="keep a Prometheus file_sd JSON list of every process's metrics endpoint here")
    proxy_metrics: tuple[str, ...] = setting(
        (), help="comma-separated HOST:PORT of proxies to list in the SD file (proxies that say their "
                 "address in HeadHello are added by themselves)", metavar="HOST:PORT,...", default_help="none")
    log_level: str = setting("INFO", help="log level")
    insecure: bool = setting(False, help="plain sockets, no authentication (benchmarks and debugging only; "
                                         "logged loudly); also $TOKENRELAY_INSECURE=1")
    stack: Optional[str] = setting(
        None, help="keep this stack's deployments apart, in <state dir>/stacks/NAME/head.db (the admin token "
                   "stays in the state directory)", default_help="<state dir>/head.db")
    reset_deployments: bool = setting(
        False, help="replace the stored deployments with the --config file's (without it the file seeds only "
                    "a new state; later starts keep what deploy/scale set)")

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


def config_from_args(argv: Optional[Sequence[str]] = None) -> HeadConfig:
    """The command line over the defaults, --insecure or $TOKENRELAY_INSECURE; bad arguments print usage
    and exit 2."""
    return parse_config_with_insecure_env(HeadConfig, argv, PROG, DESCRIPTION)
