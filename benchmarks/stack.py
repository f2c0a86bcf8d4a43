"""Benchmark processes: a tokenrelay mock stack (`python -m runtime up`) and a floor server (what they
measure with: benchmarks.meters).

Runs in the serving-path benchmark process (blocking calls, before or after its event loop runs, and the
CPU samples from loop hooks: a few psutil calls, milliseconds). Owns no socket beyond short-lived HTTP
polls to 127.0.0.1. It stops only the processes it started, by PID: SIGINT (the launcher's own orderly
stop), then SIGKILL of the tree collected before the signal, since children re-parent once their parent
dies.
"""
from __future__ import annotations

import json
import logging
import signal
import socket
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import psutil
import yaml

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: Optional[dict[str, Any]] = None,
         timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of one small request; status 0 when the server cannot be reached."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return 0, b""


def stop_process(proc: subprocess.Popen, tree: list[psutil.Process], grace: float, sig: int) -> None:
    """Send `sig` to `proc`, wait `grace` seconds, then SIGKILL whatever of `tree` is still alive."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("bench [shutdown] pid %d did not stop within %.0fs; killing its tree",
                        proc.pid, grace)
    for p in tree:
        try:
            if p.is_running():
                p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=5)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _is_proxy(cmdline: list[str]) -> bool:
    if any(a == "-m" and b == "proxy" for a, b in zip(cmdline, cmdline[1:], strict=False)):
        return True
    return bool(cmdline) and cmdline[0].startswith("gunicorn") and "proxy" in cmdline[0]


class MockStack:
    """A `python -m runtime up` stack with the mock engine on free 127.0.0.1 ports, logs in a temp dir."""

    def __init__(self, replicas: int, ttft_ms: float, itl_ms: float, tokens: int, workers: Optional[int],
                 max_ongoing: int, model: str = "mock", insecure: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tokenrelay-bench-"))
        self.insecure = insecure  # `up --insecure`: plain sockets, to measure what CURVE costs
        if insecure:  # this process's CLI calls (runtime.head_client) then talk plain to the head too
            os.environ["TOKENRELAY_INSECURE"] = "1"
        self.model = model
        self.replicas = replicas
        self.control = "tcp://127.0.0.1:%d" % free_port()
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.sd_file = self.dir / "targets.json"
        proxy: dict[str, Any] = {"bind": "127.0.0.1:%d" % self.port}
        if workers:
            proxy["workers"] = workers
        self.config = {
            "head": {"control": self.control, "publish": "tcp://127.0.0.1:%d" % free_port(),
                     "state_dir": str(self.dir / "state"),  # a fresh head state: no deployments left over
                     "prometheus_sd_file": str(self.sd_file)},
            "agent": {"host": "127.0.0.1"},
            "proxy": proxy,
            "deployments": [{"name": model, "engine": "mock", "model": model, "replicas": replicas,
                             "max_ongoing_requests": max_ongoing,
                             "engine_args": {"ttft_ms": ttft_ms, "itl_ms": itl_ms, "tokens": tokens}}],
        }
        self.proc: Optional[subprocess.Popen] = None
        self._proxy: list[psutil.Process] = []

    @property
    def keys(self) -> Optional[Path]:
        """The CURVE key directory `up` made (its operator key talks to the head); None when insecure."""
        return None if self.insecure else self.dir / "state" / "keys"

    @property
    def log_path(self) -> Path:
        return self.dir / "stack.log"

    def start(self) -> None:
        path = self.dir / "stack.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with open(self.log_path, "wb") as out:
            cmd = [sys.executable, "-m", "runtime", "up", "--config", str(path)]
            self.proc = subprocess.Popen(cmd + (["--insecure"] if self.insecure else []),
                                         cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        log.info("bench [startup] tokenrelay stack pid %d, proxy %s, logs %s, %s",
                 self.proc.pid, self.url, self.log_path, "INSECURE (no CURVE)" if self.insecure else "CURVE on")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until /ready is 200, the model is listed, a 1-token request succeeds and every replica is ready."""
        deadline = time.monotonic() + timeout
        steps = [("/ready", self._ready_ok), ("/v1/models", self._models_ok),
                 ("a 1-token request", self._one_token_ok), ("all replicas ready", self._replicas_ok)]
        for what, check in steps:
            while not check():
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError("the stack exited (code %s) before %s; see %s"
                                       % (self.proc and self.proc.returncode, what, self.log_path))
                if time.monotonic() > deadline:
                    raise RuntimeError("the stack was not ready within %.0fs (waiting for %s); see %s"
                                       % (timeout, what, self.log_path))
                time.sleep(0.25)
            log.info("bench [startup] stack: %s ok", what)

    def _ready_ok(self) -> bool:
        return http("GET", self.url + "/ready")[0] == 200

    def _models_ok(self) -> bool:
        status, body = http("GET", self.url + "/v1/models")
        return status == 200 and self.model.encode() in body

    def _one_token_ok(self) -> bool:
        body = {"model": self.model, "prompt": "ready", "max_tokens": 1}
        return http("POST", self.url + "/v1/completions", body, timeout=5.0)[0] == 200

    def _replicas_ok(self) -> bool:
        """The head says every replica is ready (the CLI's --json status); True if the CLI cannot tell."""
        cmd = [sys.executable, "-m", "runtime", "status", "--head", self.control, "--json",
               "--state-dir", str(self.dir / "state")]
        try:
            res = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=15)
            deployments = json.loads(res.stdout)["deployments"]
        except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
            log.warning("bench [startup] `runtime status --json` gave no answer; "
                        "trusting the 1-token request")
            return True
        dep = next((d for d in deployments if d.get("name") == self.model), None)
        return dep is not None and dep.get("ready_replicas", 0) >= self.replicas

    def proxy_roots(self) -> list[psutil.Process]:
        """The launcher's children started as `-m proxy` (the gunicorn master; workers are its children).

        gunicorn retitles its processes ("gunicorn: master [tokenrelay-proxy]"), so that title counts too.
        """
        alive = [p for p in self._proxy if p.is_running()]
        if alive or self.proc is None:
            return alive
        self._proxy = []
        for child in _tree(self.proc.pid)[1:]:
            try:
                cmd = child.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if _is_proxy(cmd):
                self._proxy.append(child)
        return self._proxy

    def replica_roots(self) -> list[psutil.Process]:
        """The `-m model_proc` processes of the stack (the agent's children); with vLLM their trees hold
        the engine's processes too."""
        if self.proc is None:
            return []
        out = []
        for proc in _tree(self.proc.pid)[1:]:
            try:
                cmd = proc.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(a == "-m" and b == "model_proc" for a, b in zip(cmd, cmd[1:], strict=False)):
                out.append(proc)
        return out

    def control_procs(self) -> list[psutil.Process]:
        """The rest of what tokenrelay runs: the launcher, the head and the agent (measure with
        `CpuMeter(..., trees=False)`: each process alone, not the proxy's or the replicas' trees)."""
        if self.proc is None:
            return []
        skip = {p.pid for root in self.proxy_roots() + self.replica_roots() for p in _tree(root.pid)}
        return [p for p in _tree(self.proc.pid) if p.pid not in skip]

    def stop(self) -> None:
        if self.proc is None:
            return
        tree = _tree(self.proc.pid)
        t0 = time.monotonic()
        stop_process(self.proc, tree, grace=15.0, sig=signal.SIGINT)
        log.info("bench [shutdown] stack stopped in %.1fs", time.monotonic() - t0)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class FloorProcess:
    """benchmarks/floor_server.py in its own process, like the replicas it stands in for."""

    def __init__(self, ttft_ms: float, itl_ms: float, tokens: int) -> None:
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.args = ["--port", str(self.port), "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms),
                     "--tokens", str(tokens)]
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 20.0) -> None:
        cmd = [sys.executable, str(REPO / "benchmarks" / "floor_server.py")] + self.args
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while http("GET", self.url + "/ready")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the floor server did not start")
            time.sleep(0.1)

    def roots(self) -> list[psutil.Process]:
        return [] if self.proc is None else _tree(self.proc.pid)[:1]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, _tree(self.proc.pid), grace=5.0, sig=signal.SIGINT)
