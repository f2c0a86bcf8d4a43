"""Configuration of the agent process: one frozen dataclass from which its command line derives
(runtime.settings: each field's default and help live on the field).

Runs in the agent; owns no socket. Command line over defaults: no environment variable stands in for an
option except TOKENRELAY_INSECURE for --insecure (runtime.curve); TOKENRELAY_CURVE_DIR, used when
--curve-dir is not given, is declared in runtime.curve.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Optional, Sequence

from agent.lifecycle import RestartPolicy
from runtime.addresses import check_host, check_metrics_port
from runtime.curve import parse_config_with_insecure_env
from runtime.settings import setting

PROG = "python -m agent"
DESCRIPTION = "tokenrelay agent: runs and supervises this host's replicas."


def _labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError("--label must look like key=value, got %r" % item)
        out[key] = value
    return out


def _agent_id(text: str) -> str:
    return text or socket.gethostname()  # an empty --agent-id means the default, as it always did


@dataclass(frozen=True)
class AgentConfig:
    head: str = setting("tcp://127.0.0.1:7100", help="the head's control endpoint")
    host: str = setting("127.0.0.1", help="address this host's replicas bind on (reachable by proxies)")
    agent_id: str = setting(default_factory=socket.gethostname, help="stable id of this agent", parse=_agent_id,
                            default_help="the host name")
    replica_endpoint: str = setting("tcp://127.0.0.1:*",
                                    help="endpoint the agent binds for its replicas' status reports")
    heartbeat_interval: float = setting(0.5, help="seconds between heartbeats to the head")
    # no answer from the head this long: reconnect and register again
    head_timeout: float = setting(3.0, help="seconds without an answer from the head before registering again",
                                  cli=False)
    # SIGTERM -> SIGKILL for a replica's process tree (after its drain): vLLM's own engine shutdown
    # took over 5 s on 2 loaded cores, so 10 s lets it finish instead of being killed
    stop_grace: float = setting(10.0, help="seconds between SIGTERM and SIGKILL when stopping a replica")
    liveness_timeout: float = setting(RestartPolicy.liveness_timeout,
                                      help="seconds without a replica status before it is unhealthy")
    stuck_timeout: float = setting(RestartPolicy.stuck_timeout,
                                   help="seconds with requests pending and no engine progress before unhealthy")
    labels: dict[str, str] = setting(default_factory=dict, flag="--label", repeat=True, parse=_labels,
                                     metavar="KEY=VALUE", help="host label", default_help="none")
    parent_pid: Optional[int] = setting(
        None, help="exit when this process dies (in adopt mode the replicas exit with it too, though not "
                   "with the agent)")
    curve_dir: Optional[str] = setting(
        None, help="CURVE key directory (runtime.keyring) with this agent's key agent-ID.key_secret",
        default_help="$TOKENRELAY_CURVE_DIR, else STATE_DIR/keys")
    cpu_kvcache_gib: Optional[int] = setting(None, help="KV cache GiB per CPU vLLM replica (VLLM_CPU_KVCACHE_SPACE)")
    metrics_port: int = setting(0, help="Prometheus /metrics HTTP port (0: a free one, -1: off)")
    metrics_host: str = setting(
        "127.0.0.1", help="address the agent's and its replicas' /metrics ports bind on (loopback unless set: "
                          "give this host's address for a Prometheus on another host)")
    adopt: bool = setting(
        False, help="let replicas outlive the agent and adopt them when it restarts (needs a fixed "
                    "--replica-endpoint); without it replicas exit with their agent")
    on_stop: str = setting(
        "auto", choices=("auto", "stop", "leave"),
        help="what an orderly stop (SIGTERM, SIGINT) does with the replicas: stop them (after telling the "
             "head the agent leaves), or leave them running for the next agent to adopt (needs --adopt); "
             "auto: leave with --adopt, else stop. `tokenrelay up` runs --adopt --on-stop stop: replicas "
             "outlive an agent crash, not the stack's stop")
    log_level: str = setting("INFO", help="log level")
    insecure: bool = setting(False, help="plain sockets, no authentication (benchmarks and debugging only; "
                                         "logged loudly); also $TOKENRELAY_INSECURE=1")
    replica_log_dir: Optional[str] = setting(
        None, help="write each replica's output (its engine's logs) to DIR/<replica id>.log instead of the "
                   "agent's terminal", metavar="DIR")

    @property
    def leaves_replicas(self) -> bool:
        """An orderly stop leaves the replicas running (for the next agent) instead of stopping them."""
        return self.on_stop == "leave" or (self.on_stop == "auto" and self.adopt)

    @property
    def policy(self) -> RestartPolicy:
        """The replicas' restart policy: RestartPolicy's defaults with the two timeouts set here."""
        return RestartPolicy(liveness_timeout=self.liveness_timeout, stuck_timeout=self.stuck_timeout)

    def __post_init__(self) -> None:
        if not self.head.startswith(("tcp://", "ipc://")):
            raise ValueError("--head must be a tcp:// or ipc:// endpoint, got %r" % self.head)
        check_host(self.host, "--host")  # replicas bind tcp://HOST:*
        check_metrics_port(self.metrics_port, "--metrics-port")  # 99999 was an OverflowError traceback
        if not 0.05 <= self.heartbeat_interval <= 10:
            raise ValueError("--heartbeat-interval must be between 0.05 and 10 seconds")
        if self.stop_grace < 0:
            raise ValueError("--stop-grace must be >= 0")
        if self.on_stop == "leave" and not self.adopt:
            raise ValueError("--on-stop leave needs --adopt (else nothing adopts the replicas left behind)")
        if self.adopt and self.replica_endpoint.endswith(":*"):
            raise ValueError("--adopt needs a fixed --replica-endpoint (e.g. tcp://127.0.0.1:7200 or "
                             "ipc:///run/tokenrelay/agent.sock) so replicas find the restarted agent")


def config_from_args(argv: Optional[Sequence[str]] = None) -> AgentConfig:
    """The command line over the defaults, --insecure or $TOKENRELAY_INSECURE; bad arguments print usage
    and exit 2."""
    return parse_config_with_insecure_env(AgentConfig, argv, PROG, DESCRIPTION)
