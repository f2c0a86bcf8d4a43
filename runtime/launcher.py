"""`tokenrelay up`: start head, one agent and the proxy on this host, and stop them all together.

Runs in the launcher process (the `tokenrelay` console script); owns no ZeroMQ socket. Each component
is a separate process in its own session, so a terminal's Ctrl-C (or its SIGHUP when it closes) reaches
only the launcher, which then stops them in order (proxy, agent with its replicas, replicas no agent
stopped, head) and whole process trees, SIGKILLing whatever is left after the grace period: everything
is gone within STOP_GRACE (13 s; a normal stop takes a few seconds).
Each child also carries a parent-death guard. SIGINT, SIGTERM and SIGHUP all stop the stack so
(SIGHUP is left ignored when it is ignored on entry: `nohup tokenrelay up`). A stack started in the
background is found by its launcher record (runtime.stack_record, in the stack's state directory),
which `tokenrelay down` reads; a second `up` of a running stack is refused by the same record.
An agent crash does not touch the replicas or their streams: the agent runs in adopt mode on a fixed
replica endpoint (a Unix socket in the stack's state), its replicas outlive it (but not the launcher:
`--stack-pid`), and the restarted agent adopts them; the head waits AGENT_TIMEOUT for it. The launcher is
a child subreaper, so a crashed agent's replicas become its children meanwhile (runtime.orphans).
Secure by default: before starting anything it creates, once, the keys this host needs (runtime.keyring,
in the head's state directory's keys/, or $TOKENRELAY_CURVE_DIR) and hands every child `--curve-dir`;
`insecure` hands them `--insecure` instead.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional


from proxy.config import API_KEYS_ENV
from runtime import keyring, parent_guard, stack_record
from runtime.addresses import bind_problem, tcp_address
from runtime.credentials import state_dir
from runtime.orphans import Orphans
from runtime.curve import keys_dir, warn_insecure
from runtime.settings import parse_csv
from runtime.proctree import collect_tree, signal_all
from runtime.stack_config import StackConfig, single_host_proxy_workers

log = logging.getLogger(__name__)

STOP_GRACE = 13.0  # seconds between SIGTERM and SIGKILL; the agent's replica grace (10 s + 1) fits inside
MAX_CRASHES = 5
MAX_IPC_PATH = 100  # bytes a Unix socket's path may have (sun_path is 108 with the NUL, less on some systems)
AGENT_TIMEOUT = 10.0  # the head's --agent-timeout under `tokenrelay up` (3 s elsewhere)
CRASH_WINDOW = 60.0


class Launcher:
    def __init__(self, stack: StackConfig, config_path: Path, log_level: str = "INFO",
                 insecure: bool = False, tls: Optional[tuple[str, str]] = None, stack_name: Optional[str] = None,
                 reset_deployments: bool = False, verbose: bool = False, open_api: bool = False) -> None:
        self.stack = stack
        self.open_api = open_api  # the proxy may serve /v1 beyond loopback without API keys
        self.insecure = insecure
        self.tls = tls  # (certfile, keyfile): the proxy serves HTTPS
        self._security: list[str] = []
        self._keys: Optional[Path] = None  # this host's keys (None: insecure)
        self.config_path = config_path
        self.log_level = log_level
        self.stack_name = stack_name  # the head keeps this stack's deployments apart (head --stack)
        self.reset_deployments = reset_deployments
        self.verbose = verbose  # replicas' (engines') output on this terminal instead of log files
        self.children: dict[str, subprocess.Popen] = {}
        self._args: dict[str, list[str]] = {}
        self._crashes: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._stop_signal: Optional[int] = None  # what stopped the stack (logged by _watch)
        self.orphans = Orphans(lambda: {child.pid for child in self.children.values()})
        self._wants_no_replica = False  # the head said no deployment wants a replica (or there is none)

    def _spawn(self, name: str, args: list[str]) -> None:
        self._args[name] = args
        cmd = [sys.executable, "-m", name] + args + self._security + ["--log-level", self.log_level,
                                                                     "--parent-pid", str(os.getpid())]
        self.children[name] = subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL)
        log.info("[startup] %s started, pid %d", name, self.children[name].pid)

    def _secure(self, agent_id: str) -> list[str]:
        """The security arguments every child gets; creates this host's keys on first start."""
        if self.insecure:
            warn_insecure("the whole stack")
            return ["--insecure"]
        directory = keys_dir(None, self.stack.head_state_dir)
        if keyring.ensure_single_host(directory, agent_id):
            log.info("[startup] created this host's CURVE keys in %s (see `tokenrelay keys list`)", directory)
        self._keys = directory
        return ["--curve-dir", str(directory)]

    def bind_problems(self, probe: Optional[Callable[[str, int], Optional[str]]] = None) -> list[str]:
        """What stops this stack's head or proxy from listening where its config says, as
        "head.control tcp://127.0.0.1:7100: in use" (the config key first); [] when nothing does."""
        problems = []
        for key, value in (("head.control", self.stack.head_control), ("head.publish", self.stack.head_publish),
                           ("proxy.bind", self.stack.proxy_bind)):
            address = tcp_address(value)
            problem = None if address is None else (probe or bind_problem)(*address)
            if problem:
                problems.append("%s %s: %s" % (key, value, problem))
        # replicas bind tcp://AGENT_HOST:* (a port the OS picks): only the address can be wrong
        problem = (probe or bind_problem)(self.stack.agent_host.strip("[]"), 0)
        if problem:
            problems.append("agent.host %s: %s" % (self.stack.agent_host, problem))
        # fixed metrics ports: the head's next to its control address (runtime.metrics_http.endpoint_host),
        # the agent's on loopback (its --metrics-host default)
        head_host = (tcp_address(self.stack.head_control) or ("127.0.0.1", 0))[0]
        for key, host, port in (("head.metrics_port", head_host, self.stack.head_metrics_port),
                                ("agent.metrics_port", "127.0.0.1", self.stack.agent_metrics_port)):
            problem = (probe or bind_problem)(host, port) if port > 0 else None
            if problem:
                problems.append("%s %d: %s" % (key, port, problem))
        return problems

    def record_path(self) -> Path:
        return stack_record.record_path(state_dir(self.stack.head_state_dir), self.stack_name)

    def down_command(self) -> str:
        """The `tokenrelay down` that finds this stack (the one `up` options it needs)."""
        return "tokenrelay down%s%s" % (" --stack %s" % self.stack_name if self.stack_name else "",
                                        " --state-dir %s" % self.stack.head_state_dir
                                        if self.stack.head_state_dir else "")

    def already_running(self) -> Optional[str]:
        """Why this stack must not start: its launcher record names a live launcher; else None (no
        record, or a stale one of a launcher that was SIGKILLed: it is written over)."""
        record = stack_record.read(self.record_path())
        if record is None or stack_record.running(record) is None:
            return None
        return ("stack %r is already running (launcher pid %d, started %s%s): `%s` stops it"
                % (record.stack or "default", record.pid, time.strftime("%Y-%m-%d %H:%M:%S",
                                                                        time.localtime(record.started_at)),
                   ", proxy on %s" % record.proxy if record.proxy else "", self.down_command()))

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop_signal = signum  # only enqueue: _watch logs and stops
        self._stop.set()

    def run(self) -> int:
        lock_path = self.record_path().with_name(stack_record.LOCK_FILE)
        try:
            lock = stack_record.hold_lock(lock_path)
        except OSError as exc:
            log.error("[startup] cannot create the launcher lock %s: %s", lock_path, exc.strerror)
            return 1
        if lock is None:  # another launcher of this stack runs, or is starting this very moment
            log.error("[startup] %s", self.already_running() or "stack %r is being started by another `tokenrelay "
                      "up` (it holds %s)" % (self.stack_name or "default", lock_path))
            return 1
        try:
            return self._run()
        finally:
            os.close(lock)

    def _run(self) -> int:
        s = self.stack
        running = self.already_running()
        if running:
            log.error("[startup] %s", running)
            return 1
        problems = self.bind_problems()
        if problems:
            # checked before any process starts: with a port in use, this stack's agent would join the
            # head that holds it and take that stack's replicas out of routing (same agent name); a proxy
            # that cannot bind exits 1, a crash the launcher would restart 5 times before stopping
            log.error("[startup] cannot listen on %s.%s", "; ".join(problems),
                      " Is another tokenrelay stack running (`tokenrelay status --head %s`)? Stop it, or give "
                      "this stack other ports (its config file; --port for the proxy)."
                      % local_endpoint(s.head_control) if any(p.endswith(": in use") for p in problems) else "")
            return 1
        agent_id = socket.gethostname()
        try:
            self._security = self._secure(agent_id)
        except keyring.KeyFileError as exc:
            log.error("[startup] %s", exc)
            return 2
        for sig in stop_signals():
            signal.signal(sig, self._on_signal)
        # after the handlers: `tokenrelay down` may signal the launcher as soon as it finds the record
        record = self.record_path()
        try:
            stack_record.write(record, stack_record.this_process(self.stack_name or "", s.proxy_bind,
                                                                  local_endpoint(s.head_control)))
        except OSError as exc:
            log.error("[startup] cannot write the launcher record %s: %s", record, exc.strerror)
            return 1
        try:
            return self._start_and_watch(agent_id)
        finally:
            try:
                self.shutdown()
            finally:
                stack_record.remove(record, os.getpid())

    def _start_and_watch(self, agent_id: str) -> int:
        s = self.stack
        parent_guard.become_subreaper()
        head_args = ["--control", s.head_control, "--publish", s.head_publish, "--config", str(self.config_path)]
        if s.head_state_dir:
            head_args += ["--state-dir", s.head_state_dir]
        if self.stack_name:
            head_args += ["--stack", self.stack_name]
        if self.reset_deployments:
            head_args += ["--reset-deployments"]
        head_args += ["--metrics-port", str(s.head_metrics_port), "--proxy-metrics", s.proxy_bind]
        # the agent's replicas outlive it here (adopt mode), and proxies watch them directly: a silent
        # agent is one being restarted, so give it time to come back before its replicas leave routing
        head_args += ["--agent-timeout", str(AGENT_TIMEOUT)]
        if s.head_prometheus_sd_file:
            head_args += ["--prometheus-sd-file", s.head_prometheus_sd_file]
        self._spawn("head", head_args)
        # adopt mode: a restarted agent finds its replicas on the same endpoint (kept across restarts)
        agent_args = ["--head", local_endpoint(s.head_control), "--host", s.agent_host,
                      "--agent-id", agent_id, "--metrics-port", str(s.agent_metrics_port),
                      "--adopt", "--on-stop", "stop", "--replica-endpoint", self.replica_endpoint()]
        if not self.verbose:
            logs = self.replica_log_dir()
            agent_args += ["--replica-log-dir", str(logs)]
            log.info("[startup] replica (engine) logs go to %s/<replica>.log (--verbose: to this terminal)", logs)
        self._spawn("agent", agent_args)
        workers = s.proxy_workers or single_host_proxy_workers()
        proxy_args = ["--head", local_endpoint(s.head_control), "--bind", s.proxy_bind, "--workers", str(workers)]
        if self.tls:
            proxy_args += ["--certfile", self.tls[0], "--keyfile", self.tls[1]]
        if self.open_api:
            proxy_args.append("--open-api")
        self._spawn("proxy", proxy_args)
        return self._watch()

    def replica_endpoint(self) -> str:
        """Where the agent listens for its replicas: the same across the agent's restarts, so replicas
        that outlived it find the next one. A Unix socket in the stack's state directory (no port to
        lose to another program between a crash and the restart); a free TCP port when that path is
        too long for a Unix socket's address."""
        path = self.replica_log_dir().parent / "agent.sock"
        if len(str(path)) <= MAX_IPC_PATH:
            path.parent.mkdir(parents=True, exist_ok=True)
            return "ipc://%s" % path
        return "tcp://127.0.0.1:%d" % free_port()

    def replica_log_dir(self) -> Path:
        return stack_record.stack_dir(state_dir(self.stack.head_state_dir), self.stack_name) / "logs"

    def _replica_progress(self, last: str) -> Optional[str]:
        """Log the replicas' readiness when it changed ("smollm2 1/2 ready"); None once all are ready."""
        from runtime.credentials import client_token
        from runtime.head_client import status
        if self._keys is None:  # insecure: the CLI's default keys may not match; progress is best effort
            return None
        token = client_token(None, self.stack.head_state_dir)
        if not token:  # the head has not written it yet: asking now would only be refused (and logged)
            return last
        try:
            reply = status(local_endpoint(self.stack.head_control), token, timeout=0.5, keys=self._keys)
        except Exception:  # head starting, or refused: try again later; progress lines are best effort
            return last
        line = ", ".join("%s %d/%d ready" % (d.name, d.ready_replicas, d.replicas)
                         for d in reply.deployments)
        if line and line != last:
            log.info("[startup] replicas: %s", line)
        done = all(d.ready_replicas >= d.replicas for d in reply.deployments)
        self._wants_no_replica = all(d.replicas == 0 for d in reply.deployments)
        return None if done else line

    def _watch(self) -> int:
        """Supervise until Ctrl-C: a component that crashes is restarted (the head restores its state
        from SQLite, agents re-register); one that exits with 2 (bad configuration) or crashes more than
        MAX_CRASHES times within CRASH_WINDOW seconds stops the stack."""
        base = "%s://%s" % ("https" if self.tls else "http", self.stack.proxy_bind)
        announced = False
        progress: Optional[str] = ""  # last replica summary logged; None once every replica was ready
        next_progress = time.monotonic() + 2.0
        while not self._stop.wait(0.25):
            self.orphans.reap()
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
            outcome = None if announced else probe(base + "/ready", os.environ.get(API_KEYS_ENV, ""))
            note = announcement(outcome, self._wants_no_replica)
            if note is not None:
                announced = True
                log.info("[startup] serving on %s (OpenAI API under /v1)%s; Ctrl-C or `%s` stops", base, note,
                         self.down_command())
            if progress is not None and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + 2.0
                progress = self._replica_progress(progress)
        name = signal.Signals(self._stop_signal).name if self._stop_signal else "stop"
        log.info("[shutdown] %s: stopping the stack", name)
        return 0

    def shutdown(self) -> None:
        """Stop in order, each after the one before it is gone (proxy first, so no client request and no
        proxy connection sees a replica go away; the agent before the head, so it never misses the head),
        all within STOP_GRACE; then SIGKILL whatever is left of every tree. The agent stops its replicas
        (`--on-stop stop`), adopted ones included; replicas it could not (it was dead, between a crash
        and its restart) are ours by then: the launcher stops them itself (SIGTERM: each drains, then
        ends its engine) before the head."""
        start = time.monotonic()
        trees = {name: collect_tree(child.pid) for name, child in self.children.items()}
        deadline = start + STOP_GRACE
        for name in ("proxy", "agent", "replicas", "head"):
            if name == "replicas":  # those no agent stopped (it was dead, between a crash and its restart)
                self.orphans.stop(deadline - time.monotonic())
                continue
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
        self.orphans.stop(0.0)  # the head's tree may have left some too: SIGKILL and reap
        log.info("[shutdown] stack stopped in %.1fs", time.monotonic() - start)


def stop_signals() -> list[signal.Signals]:
    """The signals that stop the stack in order: SIGINT (Ctrl-C), SIGTERM (`tokenrelay down`, systemd,
    kill) and SIGHUP (its terminal closed: stopping in order beats the default, dying with every child
    left to its parent-death guard). SIGHUP stays ignored when it is ignored on entry: `nohup tokenrelay
    up` asked to outlive the terminal."""
    signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    return signals


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_endpoint(endpoint: str) -> str:
    """How a process on this host reaches an endpoint the head binds (wildcard hosts -> loopback)."""
    for wildcard in ("//*:", "//0.0.0.0:"):
        endpoint = endpoint.replace(wildcard, "//127.0.0.1:")
    return endpoint


def announcement(outcome: Optional[str], wants_no_replica: bool) -> Optional[str]:
    """What `serving on URL` adds for a probe's outcome, or None: not to be announced yet. A proxy that
    is not ready is announced when the head says no deployment wants a replica: with no deployment (or
    every one at 0 replicas) /ready stays 503, and the stack never said it was serving."""
    if outcome == "ready":
        return ""
    if outcome == "protected":
        return " (/ready needs an API key: readiness not checked)"
    if outcome == "not_ready" and wants_no_replica:
        return (" (no replica yet, none is wanted: `tokenrelay deploy` or `scale` adds some, and a request to a "
                "deployment scaled to zero starts one)")
    return None


def probe(url: str, api_keys: str = "") -> Optional[str]:
    """The launcher's own look at its proxy: "ready" (200), "protected" (401: --protect-health and no key
    of ours works, so the proxy serves but hides readiness), "not_ready" (503: it answers, but has no
    replica to route to), None (not up yet). Sends the
    first key of $TOKENRELAY_API_KEYS when there is one; accepts the proxy's own (maybe self-signed) TLS
    certificate, since it only asks its child."""
    request = urllib.request.Request(url)
    keys = parse_csv(api_keys)
    key = keys[0] if keys else ""
    if key:
        request.add_header("Authorization", "Bearer " + key)
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=0.5, context=context) as resp:
            return "ready" if resp.status == 200 else None
    except urllib.error.HTTPError as exc:
        return {401: "protected", 503: "not_ready"}.get(exc.code)
    except OSError:
        return None
