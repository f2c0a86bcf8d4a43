"""Start a whole tokenrelay stack (`python -m runtime up`) as real processes, for integration tests.
Secure (CURVE, keys made by `up` in the state dir) unless built with insecure=True.

Logs go to the test's temp dir; teardown always stops the launcher and kills anything left of its tree.
"""
from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import msgspec
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from runtime.credentials import client_token
from tests.support import free_port, wait_for  # noqa: F401  (re-exported to the integration tests)
from runtime.head_client import HeadRefused, HeadUnreachable, status

ROOT = Path(__file__).resolve().parents[2]


def proxy_routes(base_url: str, **http: Any) -> dict[str, int]:
    """Replicas per deployment that every proxy worker has in its routing table (the proxy's
    tokenrelay_proxy_routing_table_replicas gauge: min over live workers). `http`: httpx options."""
    text = httpx.get(base_url + "/metrics", timeout=2.0, **http).text
    return {s.labels["deployment"]: int(s.value) for fam in text_string_to_metric_families(text)
            if fam.name == "tokenrelay_proxy_routing_table_replicas" for s in fam.samples}


class Stack:
    def __init__(self, tmp: Path, deployments: list[dict], workers: int = 1, insecure: bool = False,
                 tls: Optional[tuple[Path, Path]] = None, env: Optional[dict[str, str]] = None,
                 api_key: str = "", up_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.up_args = up_args  # more `tokenrelay up` options (e.g. --bind)
        self.insecure = insecure  # True: `tokenrelay up --insecure` (plain sockets)
        self.tls = tls  # (certfile, keyfile): `up --certfile --keyfile`, HTTPS checked against that cert
        self.env = env or {}  # extra environment of `tokenrelay up` (e.g. the proxy's API keys)
        # what every HTTP call of the harness passes to httpx
        self.http: dict[str, Any] = {"verify": ssl.create_default_context(cafile=str(tls[0])) if tls else True}
        if api_key:
            self.http["headers"] = {"Authorization": "Bearer " + api_key}
        self.http_port = free_port()
        self.head = "tcp://127.0.0.1:%d" % free_port()
        self.state_dir = tmp / "state"
        config = {
            "head": {"control": self.head, "publish": "tcp://127.0.0.1:%d" % free_port(),
                     "state_dir": str(self.state_dir)},
            "agent": {"host": "127.0.0.1"},
            "proxy": {"bind": "127.0.0.1:%d" % self.http_port, "workers": workers},
            "deployments": deployments,
        }
        self.config_path = tmp / "stack.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "stack.log"
        self.base_url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.http_port)
        self.proc: subprocess.Popen | None = None
        self.preexec_fn: Optional[Callable[[], None]] = None  # run in the launcher's process before exec

    def start(self, timeout: float = 60.0) -> "Stack":
        env = dict(os.environ, PYTHONPATH=str(ROOT), **self.env)
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "runtime", "up", "--config", str(self.config_path)]
        if self.tls:
            cmd += ["--certfile", str(self.tls[0]), "--keyfile", str(self.tls[1])]
        cmd += list(self.up_args)
        self.proc = subprocess.Popen(cmd + (["--insecure"] if self.insecure else []),
                                     cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=self.preexec_fn)
        wait_for(self.all_ready, timeout, "every replica READY and the proxy /ready")
        return self

    def status(self) -> dict:
        """The head's status as plain data (the shape `tokenrelay status --json` prints), by name."""
        reply = status(self.head, self.token, timeout=2.0, keys=self.keys)
        return {"deployments": {d.name: msgspec.to_builtins(d) for d in reply.deployments},
                "agents": msgspec.to_builtins(reply.agents)}

    @property
    def keys(self) -> Path:
        """The stack's CURVE key directory (runtime.keyring), made by `tokenrelay up` on start."""
        return self.state_dir / "keys"

    @property
    def token(self) -> str:
        return client_token(None, str(self.state_dir))

    def replicas(self, deployment: str) -> list[dict]:
        return self.status()["deployments"][deployment]["replica_list"]

    def all_ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError("stack exited with %s; log:\n%s" % (self.proc.returncode, self.log()))
        if not self.token:  # the head has not written its admin token yet: a status now would be refused
            return False
        try:
            st = self.status()
            r = httpx.get(self.base_url + "/ready", timeout=1.0, **self.http)
        except (HeadUnreachable, HeadRefused, httpx.HTTPError):
            return False
        deployments = st["deployments"].values()
        if r.status_code != 200 or not all(d["ready_replicas"] == d["replicas"] for d in deployments):
            return False
        # The head counts a replica ready a tick before the proxy workers get the table that has it.
        try:
            routes = proxy_routes(self.base_url, **self.http)
        except httpx.HTTPError:
            return False
        return all(routes.get(d["name"], 0) >= d["replicas"] for d in deployments)

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 15.0) -> tuple[float, list[str]]:
        """SIGINT the launcher like Ctrl-C would. Returns (seconds until it exited, "pid command" of what
        was still alive a second later); that is then killed so no test leaves processes behind."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0, []
        start = time.monotonic()
        tree = self.tree()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
            elapsed = time.monotonic() - start
        finally:
            _, alive = psutil.wait_procs(tree, timeout=1.0)
            names = []
            for p in alive:
                try:
                    if p.status() == psutil.STATUS_ZOMBIE:
                        continue  # dead; killed grandchildren wait for PID 1 to reap them, slower under load
                    names.append("%d %s" % (p.pid, " ".join(p.cmdline()[:4])))
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            self._log.close()
        return elapsed, names

    def log(self) -> str:
        """The launcher's terminal, then each replica's log file (`tokenrelay up` writes those apart)."""
        replicas = sorted(self.state_dir.glob("stacks/*/logs/*.log"))
        return self.log_path.read_text(errors="replace")[-20000:] + "".join(
            p.read_text(errors="replace")[-20000:] for p in replicas)
