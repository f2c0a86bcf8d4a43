"""Benchmark processes: a tokenrelay mock stack (`python -m runtime up`), a floor server, and CPU sampling.

Runs in the serving-path benchmark process (blocking calls, before or after its event loop runs, and the
CPU samples from loop hooks: a few psutil calls, milliseconds). Owns no socket beyond short-lived HTTP
polls to 127.0.0.1. It stops only the processes it started, by PID: SIGINT (the launcher's own orderly
stop), then SIGKILL of the tree collected before the signal, since children re-parent once their parent
dies.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

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


V = TypeVar("V")


def per_process(roots: list[psutil.Process], read: Callable[[psutil.Process], V],
                trees: bool = True) -> dict[tuple[int, float], V]:
    """`read(proc)` for every process of the roots' trees (`trees=False`: the roots alone), each once,
    keyed by (pid, create_time): a recycled PID is not the old process, and roots that contain each other
    are not counted twice."""
    out: dict[tuple[int, float], V] = {}
    for root in roots:
        try:
            procs = [root] + (root.children(recursive=True) if trees else [])
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                out[(proc.pid, proc.create_time())] = read(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    return out


class CpuMeter:
    """CPU seconds (user + system) used by a set of process trees between `start()` and `stop()`.

    Processes are cached by (pid, create_time), so a recycled PID is not mistaken for the old process;
    one that starts during the window counts from zero, one that exits during it is lost (and logged).
    """

    def __init__(self, roots: Callable[[], list[psutil.Process]], trees: bool = True,
                 overlaps: bool = False) -> None:
        self._roots = roots
        self._trees = trees  # False: the roots alone, not their children
        self.overlaps = overlaps  # True: a part of what another meter counts; never add the two up
        self._before: dict[tuple[int, float], float] = {}
        self.seconds: Optional[float] = None
        self.processes = 0

    def _sample(self) -> dict[tuple[int, float], float]:
        def cpu(proc: psutil.Process) -> float:
            t = proc.cpu_times()
            return t.user + t.system
        return per_process(self._roots(), cpu, self._trees)

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> None:
        after = self._sample()
        gone = set(self._before) - set(after)
        if gone:
            log.warning("bench [cpu] %d process(es) exited during the window; their CPU time is lost",
                        len(gone))
        self.seconds = sum(cpu - self._before.get(key, 0.0) for key, cpu in after.items())
        self.processes = len(after)


class MainThreadCpu:
    """CPU seconds (user + system) of the main thread of each process `procs()` gives (not its other
    threads, not its children), between `start()` and `stop()`: the thread that runs a server's event
    loop, which bounds what one front-end process can serve. `overlaps`: these seconds are also in a
    CpuMeter of the same process, so they are never added to one."""

    overlaps = True

    def __init__(self, procs: Callable[[], list[psutil.Process]]) -> None:
        self._procs = procs
        self._before: dict[tuple[int, float], float] = {}
        self.seconds: Optional[float] = None

    def _sample(self) -> dict[tuple[int, float], float]:
        def main_thread(proc: psutil.Process) -> float:
            return next((t.user_time + t.system_time for t in proc.threads() if t.id == proc.pid), 0.0)
        return per_process(self._procs(), main_thread, trees=False)

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> None:
        after = self._sample()
        self.seconds = sum(cpu - self._before.get(key, 0.0) for key, cpu in after.items())


class ReplicaCounters:
    """Replica-side counters between `start()` and `stop()`, summed over every replica the head lists in
    its Prometheus SD file: TokenBatch messages sent (each one a message the proxy receives) and tokens
    generated. Their ratio says how well a replica coalesces tokens per message."""

    NAMES = {"tokenrelay_replica_token_batches_total": "token_batches",
             "tokenrelay_replica_generated_tokens_total": "generated_tokens"}

    def __init__(self, sd_file: Path) -> None:
        self._sd_file = sd_file
        self._before: Optional[dict[str, float]] = None
        self.delta: Optional[dict[str, float]] = None

    def _urls(self) -> list[str]:
        try:
            entries = json.loads(self._sd_file.read_text())
        except (OSError, ValueError):
            return []
        return ["http://%s/metrics" % t for e in entries if e.get("labels", {}).get("role") == "replica"
                for t in e.get("targets", [])]

    def _sample(self) -> Optional[dict[str, float]]:
        totals = dict.fromkeys(self.NAMES.values(), 0.0)
        urls = self._urls()
        for url in urls:
            status, body = http("GET", url)
            if status != 200:
                return None
            for line in body.decode(errors="replace").splitlines():
                name, _, value = line.partition(" ")
                key = self.NAMES.get(name.split("{", 1)[0])
                if key is not None and not line.startswith("#"):
                    totals[key] += float(value)
        return totals if urls else None

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> None:
        after = self._sample()
        if after is None or self._before is None:
            log.warning("bench [replicas] could not read the replicas' counters; no tokens per message")
            return
        self.delta = {k: after[k] - self._before[k] for k in after}


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


class RssMeter:
    """Resident memory (bytes) of a set of process trees: `idle()` before the load, `loaded()` at the end
    of the measured window; `per_stream(n)` is what each of n open streams added (bytes)."""

    def __init__(self, roots: Callable[[], list[psutil.Process]]) -> None:
        self._roots = roots
        self.idle_bytes: Optional[int] = None
        self.loaded_bytes: Optional[int] = None

    def _sample(self) -> int:
        """Summed RSS, each process once: the roots may include each other's children (the proxy's
        roots are the gunicorn master and its workers, whose titles both say proxy)."""
        return sum(per_process(self._roots(), lambda proc: proc.memory_info().rss).values())

    def idle(self) -> None:
        self.idle_bytes = self._sample()

    def loaded(self) -> None:
        self.loaded_bytes = self._sample()

    def per_stream(self, streams: int) -> Optional[float]:
        if self.idle_bytes is None or self.loaded_bytes is None or streams <= 0:
            return None
        return (self.loaded_bytes - self.idle_bytes) / streams


GC_PAUSE = "tokenrelay_proxy_gc_pause_seconds"


def gc_pauses(metrics_text: str) -> dict[str, tuple[float, float]]:
    """{generation: (collections, seconds)} from a proxy's /metrics exposition."""
    out: dict[str, list[float]] = {}
    for line in metrics_text.splitlines():
        if not line.startswith(GC_PAUSE + "_count{") and not line.startswith(GC_PAUSE + "_sum{"):
            continue
        name, _, value = line.rpartition(" ")
        generation = name.split('generation="', 1)[1].split('"', 1)[0]
        pair = out.setdefault(generation, [0.0, 0.0])
        pair[0 if "_count{" in name else 1] += float(value)
    return {g: (v[0], v[1]) for g, v in out.items()}


class GcMeter:
    """The proxy's GC pauses (tokenrelay_proxy_gc_pause_seconds, read from /metrics) between `start()`
    and `stop()`: {generation: (collections, seconds)}."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._before: dict[str, tuple[float, float]] = {}
        self.delta: Optional[dict[str, tuple[float, float]]] = None

    def _sample(self) -> Optional[dict[str, tuple[float, float]]]:
        status, body = http("GET", self._url + "/metrics", timeout=5.0)
        return gc_pauses(body.decode(errors="replace")) if status == 200 else None

    def start(self) -> None:
        self._before = self._sample() or {}

    def stop(self) -> None:
        after = self._sample()
        if after is None:
            return
        self.delta = {g: (n - self._before.get(g, (0.0, 0.0))[0], s - self._before.get(g, (0.0, 0.0))[1])
                      for g, (n, s) in sorted(after.items())}


class MockStack:
    """A `python -m runtime up` stack with the mock engine on free 127.0.0.1 ports, logs in a temp dir."""

    def __init__(self, replicas: int, ttft_ms: float, itl_ms: float, tokens: int, workers: Optional[int],
                 max_ongoing: int, model: str = "mock", insecure: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tokenrelay-bench-"))
        self.insecure = insecure  # `up --insecure`: plain sockets, to measure what CURVE costs
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

    def cpu_meters(self) -> dict[str, CpuMeter]:
        """CPU meters for the three parts of the stack: the proxy tree, the control plane (launcher, head,
        agent: each process alone) and the replicas' trees. "Everything tokenrelay runs except the
        replicas" is proxy + control."""
        return {"proxy": CpuMeter(self.proxy_roots), "control": CpuMeter(self.control_procs, trees=False),
                "replicas": CpuMeter(self.replica_roots)}

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


def per_1k_tokens(cpu_seconds: Optional[float], tokens: float) -> Optional[float]:
    """CPU seconds per 1,000 streamed tokens (None when nothing was measured)."""
    if cpu_seconds is None or tokens <= 0 or math.isnan(tokens):
        return None
    return round(cpu_seconds * 1000.0 / tokens, 4)
