"""Proxy configuration: one frozen dataclass, built from CLI over env over defaults.

Runs in the proxy master (parsing) and is read by every worker. Owns no socket. Must never import
prometheus_client, gevent or zmq: `python -m proxy` imports this module before it has set
PROMETHEUS_MULTIPROC_DIR, and the gunicorn master must stay free of event loops.

Every environment variable the proxy reads is declared here:
  TOKENRELAY_PROXY_<OPTION>  default for each CLI option (e.g. TOKENRELAY_PROXY_HEAD, ..._WORKERS)
  TOKENRELAY_API_KEYS        comma-separated API keys, added to those of --api-keys-file
  PROMETHEUS_MULTIPROC_DIR   prometheus-client multiprocess directory; a fresh temp dir if unset
  TOKENRELAY_CURVE_DIR       CURVE keys when --curve-dir is not given (read by runtime.curve)
"""
from __future__ import annotations

import argparse
import glob
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from runtime.owned_dirs import owned_temp_dir

ENV_PREFIX = "TOKENRELAY_PROXY_"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
API_KEYS_ENV = "TOKENRELAY_API_KEYS"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def default_workers() -> int:
    """One worker per CPU core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ProxyConfig:
    head: str  # head control ROUTER endpoint, e.g. tcp://10.0.0.1:5555
    bind: str = "127.0.0.1:8000"
    workers: int = field(default_factory=default_workers)
    worker_connections: int = 2000
    stale_after: float = 3.0  # seconds without a table before /ready says 503
    log_level: str = "INFO"
    first_token_timeout: float = 60.0  # first send to first token (deployments may override)
    idle_timeout: float = 60.0  # longest gap between two events of one request mid-stream
    total_timeout: float = 600.0  # request start to its end
    keepalive_interval: float = 1.5  # SSE: headers + `: keep-alive` after this long without a token
    max_attempts: int = 3  # sends to replicas per request, retries before the first token included
    retry_window: float = 10.0  # seconds after the start during which a retry may begin
    breaker_failures: int = 5  # failures in a row that eject a replica
    breaker_cooldown: float = 5.0  # seconds an ejected replica waits before a probe (doubles per failure)
    load_stale_after: float = 3.0  # a load report older than this is avoided while fresh ones exist
    max_pending_chars: int = 1 << 20  # text buffered for a slow client before its stream is cut off
    max_chunk_chars: int = 1 << 16  # text coalesced into one write for a client that lags behind
    direct_writes: bool = True  # the replica reader writes SSE chunks straight to the client (client_sink.py)
    api_keys_file: Optional[str] = None  # one key per line, optional per-key requests/minute
    protect_health: bool = False  # /health, /ready and /metrics need a key too
    rate_limit: int = 0  # requests per minute per API key (0: none); a key's own line wins
    head_timeout: float = 1.0  # first HeadHello/SnapshotRequest reply timeout; doubles per retry
    head_timeout_max: float = 4.0
    graceful_timeout: float = 10.0  # gunicorn: time for in-flight requests on shutdown
    hwm: int = 100_000  # SNDHWM/RCVHWM of every replica DEALER
    max_body_bytes: int = 16 * 1024 * 1024
    curve_dir: Optional[str] = None  # CURVE keys (runtime.curve); None: $TOKENRELAY_CURVE_DIR or plain
    parent_pid: Optional[int] = None  # exit (gracefully) when this process dies; set by `tokenrelay up`

    def __post_init__(self) -> None:
        if "://" not in self.head:
            raise ValueError("--head must be a ZeroMQ endpoint like tcp://HOST:PORT, got %r" % self.head)
        host, sep, port = self.bind.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("--bind must be HOST:PORT, got %r" % self.bind)
        for name in ("workers", "worker_connections", "hwm", "max_body_bytes", "max_attempts",
                     "breaker_failures", "max_pending_chars", "max_chunk_chars"):
            if getattr(self, name) < 1:
                raise ValueError("--%s must be >= 1" % name.replace("_", "-"))
        if self.rate_limit < 0:
            raise ValueError("--rate-limit must be >= 0")
        for name in ("stale_after", "first_token_timeout", "idle_timeout", "head_timeout",
                     "head_timeout_max", "graceful_timeout", "total_timeout", "keepalive_interval",
                     "retry_window", "breaker_cooldown", "load_stale_after"):
            if not getattr(self, name) > 0:
                raise ValueError("--%s must be > 0" % name.replace("_", "-"))
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError("--log-level must be one of %s" % ", ".join(LOG_LEVELS))

    @classmethod
    def from_args(cls, argv: Optional[Sequence[str]] = None) -> "ProxyConfig":
        """Parse the CLI; on bad arguments print usage and exit with code 2 (argparse convention)."""
        parser = build_parser()
        ns = parser.parse_args(argv)
        if not ns.head:
            parser.error("--head is required (or set %sHEAD)" % ENV_PREFIX)
        try:
            return cls(
                head=ns.head, bind=ns.bind, workers=ns.workers, worker_connections=ns.worker_connections,
                stale_after=ns.stale_after, log_level=ns.log_level.upper(),
                first_token_timeout=ns.first_token_timeout, idle_timeout=ns.idle_timeout,
                graceful_timeout=ns.graceful_timeout, curve_dir=ns.curve_dir, parent_pid=ns.parent_pid,
                total_timeout=ns.total_timeout, keepalive_interval=ns.keepalive_interval,
                max_attempts=ns.max_attempts, retry_window=ns.retry_window,
                breaker_failures=ns.breaker_failures, breaker_cooldown=ns.breaker_cooldown,
                load_stale_after=ns.load_stale_after, max_body_bytes=ns.max_body_bytes,
                max_pending_chars=ns.max_pending_chars, max_chunk_chars=ns.max_chunk_chars,
                api_keys_file=ns.api_keys_file, protect_health=ns.protect_health, rate_limit=ns.rate_limit,
                direct_writes=not ns.no_direct_writes,
            )
        except ValueError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits


    def to_argv(self) -> list[str]:
        """CLI arguments that reproduce this config's CLI-settable fields (for launchers)."""
        return [
            "--head", self.head, "--bind", self.bind, "--workers", str(self.workers),
            "--worker-connections", str(self.worker_connections), "--stale-after", repr(self.stale_after),
            "--first-token-timeout", repr(self.first_token_timeout), "--idle-timeout", repr(self.idle_timeout),
            "--graceful-timeout", repr(self.graceful_timeout), "--log-level", self.log_level,
            "--total-timeout", repr(self.total_timeout), "--keepalive-interval", repr(self.keepalive_interval),
            "--max-attempts", str(self.max_attempts), "--retry-window", repr(self.retry_window),
            "--breaker-failures", str(self.breaker_failures), "--breaker-cooldown", repr(self.breaker_cooldown),
            "--load-stale-after", repr(self.load_stale_after), "--max-body-bytes", str(self.max_body_bytes),
            "--max-pending-chars", str(self.max_pending_chars), "--max-chunk-chars", str(self.max_chunk_chars),
            "--rate-limit", str(self.rate_limit),
        ] + (["--curve-dir", self.curve_dir] if self.curve_dir else []) + (
            ["--api-keys-file", self.api_keys_file] if self.api_keys_file else []) + (
            ["--protect-health"] if self.protect_health else []) + (
            [] if self.direct_writes else ["--no-direct-writes"]) + (
            ["--parent-pid", str(self.parent_pid)] if self.parent_pid is not None else [])


def _env(name: str, default: object) -> object:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m proxy",
        description="tokenrelay proxy: OpenAI-compatible HTTP API in front of tokenrelay replicas "
                    "(gunicorn + gevent workers). Each option also reads %s<OPTION>." % ENV_PREFIX,
    )
    d = ProxyConfig.__dataclass_fields__
    p.add_argument("--head", default=_env("head", None), help="head control endpoint, tcp://HOST:PORT")
    p.add_argument("--bind", default=_env("bind", d["bind"].default), help="HTTP HOST:PORT (default %(default)s)")
    p.add_argument("--workers", type=int, default=_env("workers", default_workers()),
                   help="gunicorn workers (default: one per CPU core, here %(default)s)")
    p.add_argument("--worker-connections", type=int, default=_env("worker-connections", 2000),
                   help="concurrent connections per worker (default %(default)s)")
    p.add_argument("--stale-after", type=float, default=_env("stale-after", 3.0),
                   help="seconds without a routing table before /ready fails (default %(default)s)")
    p.add_argument("--first-token-timeout", type=float, default=_env("first-token-timeout", 60.0),
                   help="seconds to wait for a replica's first answer (default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=_env("idle-timeout", 60.0),
                   help="longest silence mid-stream before the request fails (default %(default)s)")
    p.add_argument("--total-timeout", type=float, default=_env("total-timeout", d["total_timeout"].default),
                   help="longest a request may take in all (default %(default)s)")
    p.add_argument("--keepalive-interval", type=float,
                   default=_env("keepalive-interval", d["keepalive_interval"].default),
                   help="SSE: after this many seconds without a first token send the headers, then a "
                        "': keep-alive' comment every as many seconds (default %(default)s)")
    p.add_argument("--max-attempts", type=int, default=_env("max-attempts", d["max_attempts"].default),
                   help="replicas tried per request before its first token (default %(default)s)")
    p.add_argument("--retry-window", type=float, default=_env("retry-window", d["retry_window"].default),
                   help="no retry starts later than this many seconds into a request (default %(default)s)")
    p.add_argument("--breaker-failures", type=int,
                   default=_env("breaker-failures", d["breaker_failures"].default),
                   help="failures in a row that eject a replica (default %(default)s)")
    p.add_argument("--breaker-cooldown", type=float,
                   default=_env("breaker-cooldown", d["breaker_cooldown"].default),
                   help="seconds before an ejected replica is probed; doubles per failed probe "
                        "(default %(default)s)")
    p.add_argument("--load-stale-after", type=float,
                   default=_env("load-stale-after", d["load_stale_after"].default),
                   help="a replica whose load report is older is avoided while others are fresh "
                        "(default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=_env("max-body-bytes", d["max_body_bytes"].default),
                   help="largest request body; bigger ones get 413 (default %(default)s)")
    p.add_argument("--max-pending-chars", type=int,
                   default=_env("max-pending-chars", d["max_pending_chars"].default),
                   help="text held for a slow client before its stream is cut off (default %(default)s)")
    p.add_argument("--max-chunk-chars", type=int,
                   default=_env("max-chunk-chars", d["max_chunk_chars"].default),
                   help="text coalesced into one write for a client that lags (default %(default)s)")
    p.add_argument("--no-direct-writes", action="store_true", default=bool(_env("no-direct-writes", "")),
                   help="write every SSE chunk from the request's own greenlet through gunicorn instead of "
                        "straight from the replica reader (slower; for comparison and as an escape hatch)")
    p.add_argument("--api-keys-file", default=_env("api-keys-file", None),
                   help="file of API keys, one per line, each optionally followed by its requests/minute; "
                        "with keys (here or in $%s) every /v1 request needs 'Authorization: Bearer KEY'"
                        % API_KEYS_ENV)
    p.add_argument("--protect-health", action="store_true", default=bool(_env("protect-health", "")),
                   help="also require a key for /health, /ready and /metrics")
    p.add_argument("--rate-limit", type=int, default=_env("rate-limit", 0),
                   help="requests per minute per API key, shared by the workers (default 0: none)")
    p.add_argument("--graceful-timeout", type=float, default=_env("graceful-timeout", 10.0),
                   help="seconds workers get to finish requests on shutdown (default %(default)s)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="stop when this process dies (set by `tokenrelay up`)")
    p.add_argument("--curve-dir", default=None,
                   help="CURVE key directory (see `tokenrelay keys generate`); default $TOKENRELAY_CURVE_DIR, "
                        "plain sockets when neither is set")
    p.add_argument("--log-level", default=_env("log-level", "INFO"), type=str.upper, choices=LOG_LEVELS)
    return p


def prepare_metrics_dir() -> str:
    """Point prometheus-client at an empty multiprocess directory; call before it is imported.

    Uses $PROMETHEUS_MULTIPROC_DIR when set (wiping stale *.db files from an earlier run), else a fresh
    temp dir that the creating process removes at exit (workers inherit the atexit hook, so it checks
    the pid).
    """
    path = os.environ.get(METRICS_DIR_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.unlink(stale)
        return path
    path = owned_temp_dir("tokenrelay-proxy-metrics-")
    os.environ[METRICS_DIR_ENV] = path
    return path
