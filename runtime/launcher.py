"""`tokenrelay up`: start head, one agent and the proxy on this host, and stop them all together.

Runs in the launcher process (the `tokenrelay` console script); owns no ZeroMQ socket. Each component
is a separate process in its own session, so a terminal's Ctrl-C reaches only the launcher, which then
stops them in order (proxy, agent, head) and whole process trees, SIGKILLing whatever is left after the
grace period: everything is gone within STOP_GRACE (13 s; a normal stop takes a few seconds).
Each child also carries a parent-death guard.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

from runtime.credentials import state_dir
from runtime.proctree import collect_tree, signal_all
from runtime.stack_config import StackConfig, single_host_proxy_workers

log = logging.getLogger(__name__)

STOP_GRACE = 13.0  # seconds between SIGTERM and SIGKILL; the agent's replica grace (10 s + 1) fits inside
MAX_CRASHES = 5
CRASH_WINDOW = 60.0


class Launcher:
    def __init__(self, stack: StackConfig, config_path: Path, log_level: str = "INFO",
                 stack_name: Optional[str] = None, reset_deployments: bool = False, verbose: bool = False) -> None:
        self.stack = stack
        self.config_path = config_path
        self.log_level = log_level
        self.stack_name = stack_name  # the head keeps this stack's deployments apart (head --stack)
        self.reset_deployments = reset_deployments
        self.verbose = verbose  # replicas' (engines') output on this terminal instead of log files
        self.children: dict[str, subprocess.Popen] = {}
        self._args: dict[str, list[str]] = {}
        self._crashes: dict[str, list[float]] = {}
        self._stop = threading.Event()

    def _spawn(self, name: str, args: list[str]) -> None:
        self._args[name] = args
        cmd = [sys.executable, "-m", name] + args + ["--log-level", self.log_level,
                                                    "--parent-pid", str(os.getpid())]
        self.children[name] = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL)
        log.info("[startup] %s started, pid %d", name, self.children[name].pid)

    def run(self) -> int:
        s = self.stack
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        head_args = ["--control", s.head_control, "--publish", s.head_publish, "--config", str(self.config_path)]
        if s.head_state_dir:
            head_args += ["--state-dir", s.head_state_dir]
        if self.stack_name:
            head_args += ["--stack", self.stack_name]
        if self.reset_deployments:
            head_args += ["--reset-deployments"]
        head_args += ["--metrics-port", str(s.head_metrics_port), "--proxy-metrics", s.proxy_bind]
        if s.head_prometheus_sd_file:
            head_args += ["--prometheus-sd-file", s.head_prometheus_sd_file]
        self._spawn("head", head_args)
        agent_args = ["--head", local_endpoint(s.head_control), "--host", s.agent_host,
                      "--metrics-port", str(s.agent_metrics_port)]
        if not self.verbose:
            logs = self.replica_log_dir()
            agent_args += ["--replica-log-dir", str(logs)]
            log.info("[startup] replica (engine) logs go to %s/<replica>.log (--verbose: to this terminal)", logs)
        self._spawn("agent", agent_args)
        workers = s.proxy_workers or single_host_proxy_workers()
        proxy_args = ["--head", local_endpoint(s.head_control), "--bind", s.proxy_bind, "--workers", str(workers)]
        self._spawn("proxy", proxy_args)
        code = self._watch()
        self.shutdown()
        return code

    def replica_log_dir(self) -> Path:
        base = state_dir(self.stack.head_state_dir)
        return base / "stacks" / self.stack_name / "logs" if self.stack_name else base / "logs"

    def _replica_progress(self, last: str) -> Optional[str]:
        """Log the replicas' readiness when it changed ("smollm2 1/2 ready"); None once all are ready."""
        from runtime.credentials import client_token
        from runtime.head_client import status
        try:
            reply = status(local_endpoint(self.stack.head_control), client_token(None, self.stack.head_state_dir),
                           timeout=0.5)
        except Exception:  # head starting, or refused: try again later; progress lines are best effort
            return last
        line = ", ".join("%s %d/%d ready" % (d["name"], d["ready_replicas"], d["replicas"])
                         for d in reply.deployments)
        if line and line != last:
            log.info("[startup] replicas: %s", line)
        done = all(d["ready_replicas"] >= d["replicas"] for d in reply.deployments)
        return None if done else line

    def _watch(self) -> int:
        """Supervise until Ctrl-C: a component that crashes is restarted (the head restores its state
        from SQLite, agents re-register); one that exits with 2 (bad configuration) or crashes more than
        MAX_CRASHES times within CRASH_WINDOW seconds stops the stack."""
        url = "http://%s/ready" % self.stack.proxy_bind
        announced = False
        progress: Optional[str] = ""  # last replica summary logged; None once every replica was ready
        next_progress = time.monotonic() + 2.0
        while not self._stop.wait(0.25):
            for name, child in list(self.children.items()):
                rc = child.poll()
                if rc is None:
                    continue
                now = time.monotonic()
                crashes = [t for t in self._crashes.get(name, []) if now - t < CRASH_WINDOW] + [now]
                self._crashes[name] = crashes
                if rc == 2 or len(crashes) > MAX_CRASHES:
                    log.error("[shutdown] %s exited with code %d (%d time(s) in %.0fs); stopping the stack",
                              name, rc, len(crashes), CRASH_WINDOW)
                    return 1
                log.warning("[restart] %s exited with code %d; restarting it", name, rc)
                self._spawn(name, self._args[name])
            if not announced and _ready(url):
                announced = True
                log.info("[startup] serving on http://%s (OpenAI API under /v1); Ctrl-C stops",
                         self.stack.proxy_bind)
            if progress is not None and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + 2.0
                progress = self._replica_progress(progress)
        log.info("[shutdown] stopping the stack")
        return 0

    def shutdown(self) -> None:
        """Stop in order, each after the one before it is gone (proxy first, so no client request and no
        proxy connection sees a replica go away; the agent before the head, so it never misses the head),
        all within STOP_GRACE; then SIGKILL whatever is left of every tree."""
        start = time.monotonic()
        trees = {name: collect_tree(child.pid) for name, child in self.children.items()}
        deadline = start + STOP_GRACE
        for name in ("proxy", "agent", "head"):
            child = self.children.get(name)
            if child is None:
                continue
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("[shutdown] %s did not stop in %.0fs; killing its tree", name, STOP_GRACE)
        for name, child in self.children.items():
            procs = trees[name] + collect_tree(child.pid)
            signal_all(procs, signal.SIGKILL)  # whatever is left, including re-parented descendants
            child.poll()
        log.info("[shutdown] stack stopped in %.1fs", time.monotonic() - start)


def local_endpoint(endpoint: str) -> str:
    """How a process on this host reaches an endpoint the head binds (wildcard hosts -> loopback)."""
    for wildcard in ("//*:", "//0.0.0.0:"):
        endpoint = endpoint.replace(wildcard, "//127.0.0.1:")
    return endpoint


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            return resp.status == 200
    except OSError:
        return False
