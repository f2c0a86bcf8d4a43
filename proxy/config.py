"""Proxy configuration: one frozen dataclass, built from CLI over env over defaults (runtime.settings).

Runs in the proxy master (parsing) and is read by every worker. Owns no socket. Must never import
prometheus_client, gevent or zmq: `python -m proxy` imports this module before it has set
PROMETHEUS_MULTIPROC_DIR, and the gunicorn master must stay free of event loops.

Every environment variable the proxy reads is declared here:
  TOKENRELAY_PROXY_<FIELD>   default for each CLI option (e.g. TOKENRELAY_PROXY_HEAD, ..._WORKERS;
                             booleans 1/true/yes/on or 0/false/no/off: ..._PROTECT_HEALTH=0 is off)
  TOKENRELAY_API_KEYS        comma-separated API keys, added to those of --api-keys-file
  PROMETHEUS_MULTIPROC_DIR   prometheus-client multiprocess directory; a fresh temp dir if unset
  TOKENRELAY_CURVE_DIR       CURVE keys when --curve-dir is not given (read by runtime.curve)
  TOKENRELAY_INSECURE        1: plain sockets, like --insecure (read by runtime.curve)
"""
from __future__ import annotations

import glob
import ipaddress
import os
import ssl
from dataclasses import dataclass
from typing import Optional, Sequence

from runtime.addresses import check_host_port
from runtime.owned_dirs import owned_temp_dir
from runtime.settings import parse_config, setting

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


def check_tls_pair(certfile: str, keyfile: str) -> None:
    """ValueError unless the certificate and key load together as the workers will load them: a file
    that is not PEM, or a key that is not the certificate's, made every gunicorn worker die at boot and
    be replaced at once, forever (a traceback each, four a second), while the master looked alive."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # a callback, so an encrypted key fails here instead of prompting on the terminal
        context.load_cert_chain(certfile, keyfile, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ValueError("--certfile %s --keyfile %s: cannot load them as a certificate and its key (PEM, "
                         "unencrypted key): %s" % (certfile, keyfile, exc)) from None


@dataclass(frozen=True)
class ProxyConfig:
    head: str = setting(help="head control endpoint, tcp://HOST:PORT", metavar="ENDPOINT")
    bind: str = setting("127.0.0.1:8000", help="HTTP HOST:PORT")
    workers: int = setting(default_factory=default_workers, help="gunicorn workers",
                           default_help="one per CPU core this process may use")
    worker_connections: int = setting(
        16384, help="concurrent client connections per worker (one file descriptor each: the proxy raises "
                    "its open-files limit to fit, up to the hard limit)")
    backlog: int = setting(
        4096, help="connections the kernel queues on the listening socket before a worker accepts them "
                   "(capped by the host's net.core.somaxconn)")
    max_idle_per_client: int = setting(
        512, help="idle connections (no request in progress) one client address may hold per worker; "
                  "past it that address's longest-idle one is closed (keep it above the keep-alive pool of "
                  "the busiest address: a load balancer or NAT in front sends every client from a few)")
    max_idle_connections: int = setting(
        512, help="idle connections per worker in all; past it the longest-idle one is closed")
    stale_after: float = setting(3.0, help="seconds without a routing table before /ready fails")
    log_level: str = setting("INFO", help="log level", parse=str.upper, choices=LOG_LEVELS)
    first_token_timeout: float = setting(
        60.0, help="seconds to wait for a replica's first answer (deployments may override)")
    idle_timeout: float = setting(60.0, help="longest silence mid-stream before the request fails")
    total_timeout: float = setting(600.0, help="longest a request may take in all")
    keepalive_interval: float = setting(
        1.5, help="SSE: after this many seconds without a first token send the headers, then a "
                  "': keep-alive' comment every as many seconds")
    max_attempts: int = setting(3, help="replicas tried per request before its first token")
    retry_window: float = setting(10.0, help="no retry starts later than this many seconds into a request")
    max_resumes: int = setting(
        3, help="times one request may move mid-stream to another replica after its replica was lost "
                "(deployments switch resuming off with routing.resume: false)")
    breaker_failures: int = setting(5, help="failures in a row that eject a replica")
    breaker_cooldown: float = setting(
        5.0, help="seconds before an ejected replica is probed; doubles per failed probe")
    breaker_max_share: float = setting(
        0.5, help="largest share of a deployment's replicas the circuit breaker may eject at once "
                  "(0: never eject; 1: all)")
    load_stale_after: float = setting(
        3.0, help="a replica whose load report is older is avoided while others are fresh")
    max_pending_chars: int = setting(1 << 20, help="text held for a slow client before its stream is cut off")
    max_chunk_chars: int = setting(1 << 16, help="text coalesced into one write for a client that lags")
    direct_writes: bool = setting(
        True, help="the replica reader writes SSE chunks straight to the client (client_sink.py); "
                   "--no-direct-writes writes each from the request's own greenlet through gunicorn "
                   "(slower; for comparison and as an escape hatch)")
    api_keys_file: Optional[str] = setting(
        None, help="file of API keys, one per line, each optionally followed by its requests/minute; "
                   "with keys (here or in $%s) every request but /openapi.json and the health paths "
                   "needs 'Authorization: Bearer KEY'"
                   % API_KEYS_ENV, metavar="FILE")
    protect_health: bool = setting(False, help="also require a key for /health, /ready and /metrics")
    cors_origins: str = setting(
        "", help="web origins whose pages may call the API from a browser (CORS), comma-separated "
                 "(https://app.example.com), or * for any; empty: none. `vllm serve` allows * by default; "
                 "tokenrelay allows none unless told, since any page the user opens could otherwise use "
                 "a keyless proxy on loopback", metavar="ORIGINS")
    open_api: bool = setting(
        False, help="serve /v1 with no API key on an address other than loopback (anyone who reaches it "
                    "can use every model); without it such a proxy refuses to start")
    rate_limit: int = setting(0, help="requests per minute per API key, shared by the workers (0: none)")
    head_timeout: float = setting(
        1.0, help="first HeadHello/SnapshotRequest reply timeout; doubles per retry", cli=False, env=False)
    head_timeout_max: float = setting(4.0, help="longest head reply timeout", cli=False, env=False)
    graceful_timeout: float = setting(10.0, help="seconds workers get to finish requests on shutdown")
    hwm: int = setting(100_000, help="SNDHWM/RCVHWM of every replica DEALER", cli=False, env=False)
    max_body_bytes: int = setting(16 * 1024 * 1024, help="largest request body; bigger ones get 413")
    body_timeout: float = setting(
        30.0, help="seconds a request body may send nothing (a pause, not the whole upload); then 408 and the "
                   "connection closes (a client that stops sending mid-body would otherwise hold it forever)")
    body_min_rate: int = setting(
        4096, help="bytes/s a request body must average once its first --body-timeout seconds are over: it may "
                   "take --body-timeout + its size / this rate in all, else 408 and the connection closes (a body "
                   "trickled just inside --body-timeout would otherwise hold its connection for as long as the "
                   "client likes); 0: no such bound")
    send_timeout: float = setting(
        60.0, help="seconds one write of a response may wait for the client to take its bytes (a write is one "
                   "coalesced chunk of a stream, or 64 KiB of a JSON answer); a client that stopped reading "
                   "but keeps its connection open is then cut off, its request aborted at the replica and its "
                   "connection closed (it would otherwise hold a worker slot forever: TCP keeps a zero window "
                   "open indefinitely)")
    header_timeout: float = setting(
        5.0, help="seconds a client has to send a request's whole header block, counted from when the "
                  "connection opens or its previous request ends (so also how long an idle keep-alive "
                  "connection stays open); then the connection closes")
    curve_dir: Optional[str] = setting(
        None, help="CURVE key directory holding one proxy-NAME.key_secret, head.key and replica.key (see "
                   "`tokenrelay keys add proxy`)", env=False, metavar="DIR",
        default_help="$TOKENRELAY_CURVE_DIR, else STATE_DIR/keys")
    insecure: bool = setting(
        False, help="plain ZeroMQ sockets, no authentication (benchmarks and debugging only; logged at "
                    "WARNING); also $TOKENRELAY_INSECURE=1")
    certfile: Optional[str] = setting(
        None, help="serve HTTPS with this PEM certificate (chain); needs --keyfile", metavar="FILE")
    keyfile: Optional[str] = setting(None, help="the certificate's PEM private key", metavar="FILE")
    parent_pid: Optional[int] = setting(
        None, help="stop (gracefully) when this process dies (set by `tokenrelay up`)", env=False)

    @property
    def loopback_only(self) -> bool:
        """The HTTP socket is reachable from this host only (127.0.0.0/8, ::1, localhost)."""
        host = self.bind.rpartition(":")[0].strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    def __post_init__(self) -> None:
        if "://" not in self.head:
            raise ValueError("--head must be a ZeroMQ endpoint like tcp://HOST:PORT, got %r" % self.head)
        check_host_port(self.bind, "--bind")
        if not 0.0 <= self.breaker_max_share <= 1.0:
            raise ValueError("--breaker-max-share must be between 0 and 1")
        if self.max_resumes < 0:
            raise ValueError("--max-resumes must be >= 0")
        for name in ("workers", "worker_connections", "backlog", "hwm", "max_body_bytes", "max_attempts",
                     "breaker_failures", "max_pending_chars", "max_chunk_chars", "max_idle_per_client",
                     "max_idle_connections"):
            if getattr(self, name) < 1:
                raise ValueError("--%s must be >= 1" % name.replace("_", "-"))
        for name in ("rate_limit", "body_min_rate"):
            if getattr(self, name) < 0:
                raise ValueError("--%s must be >= 0" % name.replace("_", "-"))
        for name in ("stale_after", "first_token_timeout", "idle_timeout", "head_timeout",
                     "head_timeout_max", "graceful_timeout", "total_timeout", "keepalive_interval",
                     "retry_window", "breaker_cooldown", "load_stale_after", "body_timeout",
                     "header_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError("--%s must be > 0" % name.replace("_", "-"))
        for origin in self.cors_origin_list:
            scheme, sep, rest = origin.partition("://")
            if origin != "*" and (scheme not in ("http", "https") or not sep or not rest or "/" in rest):
                raise ValueError("--cors-origins: %r is not an origin like https://app.example.com (or *)" % origin)
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("--certfile and --keyfile go together (HTTPS needs both)")
        for name in ("certfile", "keyfile"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError("--%s %s: not a readable file" % (name, path))
        if self.certfile is not None and self.keyfile is not None:
            check_tls_pair(self.certfile, self.keyfile)
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError("--log-level must be one of %s" % ", ".join(LOG_LEVELS))

    @property
    def scheme(self) -> str:
        return "https" if self.certfile else "http"

    @classmethod
    def from_args(cls, argv: Optional[Sequence[str]] = None) -> "ProxyConfig":
        """CLI over env (TOKENRELAY_PROXY_<FIELD>) over defaults; bad arguments print usage and exit 2."""
        return parse_config(
            cls, argv, prog="python -m proxy", env_prefix=ENV_PREFIX,
            description="tokenrelay proxy: OpenAI-compatible HTTP API in front of tokenrelay replicas "
                        "(gunicorn + gevent workers).")


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
