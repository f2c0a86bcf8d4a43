"""Start the proxy: a gunicorn master with gevent workers serving the Falcon app.

`run(config)` runs in the proxy's main process, which becomes the gunicorn master; it owns the listening
HTTP socket (gunicorn's) and no ZeroMQ socket. Each worker, after fork and gevent's monkey-patching,
builds its app and Gateway in `load()` and starts the Gateway (zmq.green Context, head subscriber,
replica DEALERs) in the `post_worker_init` hook. The master must never create a zmq Context, import
gevent-patched state, or touch prometheus_client before PROMETHEUS_MULTIPROC_DIR is set.

Exit codes (gunicorn's): 0 after a clean shutdown (SIGTERM/SIGINT), 1 when the HTTP socket cannot be
bound, 3 when a worker fails to boot (e.g. an exception in post_worker_init), 2 for bad CLI args
(argparse, before this module runs).
"""
from __future__ import annotations

import logging
import os
import resource
import sys
from typing import Any, Optional

from gunicorn.app.base import BaseApplication

from proxy.config import METRICS_DIR_ENV, ProxyConfig, prepare_metrics_dir

log = logging.getLogger(__name__)


class ProxyApplication(BaseApplication):
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.gateway: Optional[Any] = None  # proxy.gateway.Gateway, per worker after load()
        super().__init__()

    def load_config(self) -> None:
        c = self.config
        settings = {
            "bind": [c.bind],
            "workers": c.workers,
            "worker_class": "proxy.gunicorn_worker.ProxyGeventWorker",  # gevent, idle connections bounded
            "worker_connections": c.worker_connections,
            "backlog": c.backlog,
            "graceful_timeout": int(max(1, c.graceful_timeout)),
            "timeout": 30,
            "keepalive": 5,
            "loglevel": c.log_level.lower(),
            "errorlog": "-",
            "accesslog": None,
            "proc_name": "tokenrelay-proxy",
            # gunicorn >= 24 starts an asyncio control-socket thread in the master at a fixed path
            # (~/.gunicorn/gunicorn.ctl): shared between proxies on a host, and a loop we do not want.
            "control_socket_disable": True,
            "on_starting": self._on_starting,
            "post_worker_init": self._post_worker_init,
            "post_request": _post_request,
            "worker_exit": self._worker_exit,
            "child_exit": _child_exit,
        }
        if c.certfile:  # HTTPS: gunicorn wraps each accepted socket (the gevent worker included)
            settings.update(certfile=c.certfile, keyfile=c.keyfile)
        for key, value in settings.items():
            if key in self.cfg.settings:  # control_socket_disable only exists in newer gunicorn
                self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs in the worker after gevent patched it; the master never imports gevent/zmq code paths.
        from proxy.app import create_app
        from proxy.gateway import Gateway
        from proxy.gunicorn_hooks import install_json_errors

        install_json_errors()  # gunicorn's own errors (414, 431, bad headers) as OpenAI JSON

        self.gateway = Gateway(self.config)
        return create_app(self.gateway, self.config)

    def _on_starting(self, server: Any) -> None:
        log.info("[startup] proxy on %s://%s with %d gevent worker(s), head %s, metrics in %s", self.config.scheme,
                 self.config.bind, self.config.workers, self.config.head, os.environ.get(METRICS_DIR_ENV))

    def _post_worker_init(self, worker: Any) -> None:
        if self.gateway is None:
            raise RuntimeError("post_worker_init before load(): the worker has no gateway")
        self.gateway.start()
        import gevent

        from proxy import metrics
        from runtime.gc_policy import prepare_to_serve, run_paced

        metrics.watch_gc()
        prepare_to_serve("proxy worker")  # last: everything the worker built so far is start-up state
        pacer = gevent.spawn(run_paced, gevent.sleep, self.gateway.streams)
        pacer.link_exception(lambda g: log.error("[gc] the collection pacer died: %r; CPython's automatic "
                                                 "collection goes on alone", g.exception))

    def _worker_exit(self, server: Any, worker: Any) -> None:
        if self.gateway is not None:
            try:
                self.gateway.stop()
            except Exception:
                log.exception("[shutdown] closing the worker's gateway failed")


def _post_request(worker: Any, req: Any, environ: dict[str, Any], resp: Any) -> None:
    # In the worker, after a response: one refused with its big body unread closes the connection
    # (proxy/gunicorn_hooks.py says why), instead of gunicorn draining the body through the worker.
    from proxy.gunicorn_hooks import LINGER_ENV, linger_close

    if environ.get(LINGER_ENV):
        sock = environ["gunicorn.socket"]
        linger_close(sock)
        worker.end_connection(sock)  # ProxyGeventWorker (worker_class above): no keep-alive after this


def _child_exit(server: Any, worker: Any) -> None:
    # In the master, after a worker exited: drop its live gauges from the multiprocess directory.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


FD_MARGIN = 1024  # descriptors a worker needs beside its client connections: replicas, head, files, logs


def raise_open_files_limit(connections: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (the workers inherit it) to fit `connections` client
    connections per worker, up to the hard limit; returns the soft limit now in force. A hard limit too
    low is logged (docs/operations.md says how to raise it): past it, accept() fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + FD_MARGIN
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. above macOS's kern.maxfilesperproc
            log.warning("[startup] cannot raise the open-files limit to %d: %s", target, exc)
    if soft < want:
        log.warning("[startup] open-files limit %d (hard) is below the %d that --worker-connections %d "
                    "needs: connections past it fail (raise the hard limit: docs/operations.md)",
                    soft, want, connections)
    return soft


def run(config: ProxyConfig) -> int:
    """Serve until SIGTERM/SIGINT. Blocks; gunicorn ends the process via sys.exit with its exit code."""
    if not os.environ.get(METRICS_DIR_ENV) and "prometheus_client" in sys.modules:
        log.warning("prometheus_client was imported before %s was set; /metrics covers one worker only",
                    METRICS_DIR_ENV)
    prepare_metrics_dir()
    if not logging.getLogger().handlers:  # started without proxy/__main__
        from runtime.logs import proxy_role, setup_logging

        setup_logging(proxy_role(), config.log_level)
    raise_open_files_limit(config.worker_connections)
    ProxyApplication(config).run()
    return 0
