"""A tokenrelay cluster started process by process (head, several agents, proxy), for fault tests.

Unlike `Stack` (one `tokenrelay up`), each component here can be killed and restarted on its own. Agents
get their own loopback addresses (127.0.0.2, 127.0.0.3, ...), so their replicas listen on distinct hosts
as they would across machines. Every process is started with `sys.executable -m ...`, logs to the test's
temp dir, and is killed (whole tree) at teardown. Secure by default: the harness makes the cluster's
keys in STATE/keys (runtime.keyring) as `tokenrelay keys` would, one per agent; insecure=True passes
--insecure to every process instead.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import httpx
import msgspec
import psutil
import yaml

from runtime import keyring
from runtime.credentials import client_token
from runtime.head_client import HeadRefused, HeadUnreachable, status
from tests.integration.stack import ROOT, free_port, proxy_routes, wait_for


class Cluster:
    def __init__(self, tmp: Path, deployments: list[dict], proxy_workers: int = 2,
                 agent_timeout: float = 3.0, insecure: bool = False) -> None:
        self.tmp = tmp
        self.state_dir = tmp / "state"
        self.insecure = insecure
        self.keys = self.state_dir / "keys"
        if not insecure:
            keyring.ensure_single_host(self.keys, None)
        self.head = "tcp://127.0.0.1:%d" % free_port()
        self.publish = "tcp://127.0.0.1:%d" % free_port()
        self.http_port = free_port()
        self.base_url = "http://127.0.0.1:%d" % self.http_port
        self.proxy_workers = proxy_workers
        self.agent_timeout = agent_timeout
        self.config_path = tmp / "deployments.yaml"
        self.config_path.write_text(yaml.safe_dump({"deployments": deployments}))
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / ("%s.log" % name), "ab")
        self._logs.append(log)
        env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENRELAY_STATE_DIR=str(self.state_dir))
        if args[0] == "agent" and "--agent-id" in args and not self.insecure:
            keyring.ensure(self.keys, "agent", args[args.index("--agent-id") + 1])  # `tokenrelay keys add agent`
        args = args + (["--insecure"] if self.insecure else [])
        proc = subprocess.Popen([sys.executable, "-m"] + args, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_head(self, *extra: str) -> None:
        self._spawn("head", ["head", "--control", self.head, "--publish", self.publish,
                             "--config", str(self.config_path), "--agent-timeout", str(self.agent_timeout),
                             *extra])

    def start_agent(self, name: str, host: str) -> None:
        self._spawn("agent-" + name, ["agent", "--head", self.head, "--host", host, "--agent-id", name])

    def start_proxy(self) -> None:
        self._spawn("proxy", ["proxy", "--head", self.head, "--bind", "127.0.0.1:%d" % self.http_port,
                              "--workers", str(self.proxy_workers)])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        proc = self.procs[name]
        os.kill(proc.pid, sig)
        proc.wait(10)
        return proc.pid

    def proxy_workers_pids(self) -> list[int]:
        return [c.pid for c in psutil.Process(self.procs["proxy"].pid).children()]

    def stop_all(self) -> None:
        trees = []
        for proc in self.procs.values():
            try:
                root = psutil.Process(proc.pid)
                trees += [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for name in ("proxy",) + tuple(n for n in self.procs if n.startswith("agent-")) + ("head",):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(trees, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for log in self._logs:
            log.close()

    # ------------------------------------------------------------------ observing

    def status(self) -> dict:
        reply = status(self.head, client_token(None, str(self.state_dir)), timeout=2.0,
                       keys=None if self.insecure else self.keys)
        # plain data (the shape `tokenrelay status --json` prints), by name
        return {"deployments": {d.name: msgspec.to_builtins(d) for d in reply.deployments},
                "agents": {a.agent_id: msgspec.to_builtins(a) for a in reply.agents}}

    def replicas(self, deployment: str) -> list[dict]:
        return self.status()["deployments"][deployment]["replica_list"]

    def try_status(self) -> Optional[dict]:
        try:
            return self.status()
        except (HeadUnreachable, HeadRefused):
            return None

    def ready(self, deployment: str, count: int) -> bool:
        st = self.try_status()
        if st is None:
            return False
        reps = st["deployments"][deployment]["replica_list"]
        if sum(1 for r in reps if r["state"] == "ready") < count:
            return False
        try:
            if httpx.get(self.base_url + "/ready", timeout=1.0).status_code != 200:
                return False
            return proxy_routes(self.base_url).get(deployment, 0) >= count  # every worker has them
        except httpx.HTTPError:
            return False

    def wait_ready(self, deployment: str, count: int, timeout: float = 30.0) -> None:
        wait_for(lambda: self.ready(deployment, count), timeout, "%d ready replicas of %s" % (count, deployment))

    def log(self, name: str) -> str:
        return (self.tmp / ("%s.log" % name)).read_text(errors="replace")[-20000:]


def timed_wait(predicate, timeout: float, what: str) -> float:
    """Wait for `predicate`; return how long it took (seconds)."""
    start = time.monotonic()
    wait_for(predicate, timeout, what, interval=0.02)
    return time.monotonic() - start
