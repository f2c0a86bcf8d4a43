"""Proxy configuration: one frozen dataclass, built from CLI over env over defaults.

Runs in the proxy master (parsing) and is read by every worker. Owns no socket. Must never import
prometheus_client, gevent or zmq: `python -m proxy` imports this module before it has set
PROMETHEUS_MULTIPROC_DIR, and the gunicorn master must stay free of event loops.

Every environment variable the proxy reads is declared here:
  TOKENRELAY_PROXY_<OPTION>  default for each CLI option (e.g. TOKENRELAY_PROXY_HEAD, ..._WORKERS)
  PROMETHEUS_MULTIPROC_DIR   prometheus-client multiprocess directory; a fresh temp dir if unset
  TOKENRELAY_CURVE_DIR       CURVE keys when --curve-dir is not given (read by runtime.curve)
"""
from __future__ import annotations

import argparse
import atexit
import glob
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

ENV_PREFIX = "TOKENRELAY_PROXY_"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
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
    first_token_timeout: float = 60.0  # wait for the replica's first event before sending headers
    idle_timeout: float = 60.0  # longest gap between two events of one request mid-stream
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
        for name in ("workers", "worker_connections", "hwm", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError("--%s must be >= 1" % name.replace("_", "-"))
        for name in ("stale_after", "first_token_timeout", "idle_timeout", "head_timeout",
                     "head_timeout_max", "graceful_timeout"):
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
        ] + (["--curve-dir", self.curve_dir] if self.curve_dir else []) + (
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
    path = tempfile.mkdtemp(prefix="tokenrelay-proxy-metrics-")
    os.environ[METRICS_DIR_ENV] = path
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path
