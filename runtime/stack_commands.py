"""`tokenrelay up` and `tokenrelay down`: start a single-host stack, and stop one started elsewhere.

Runs in the CLI process; owns no socket. `up` becomes the stack's launcher (runtime.launcher); `down`
finds a running stack by its launcher record (runtime.stack_record) in the stack's state directory,
sends the launcher SIGTERM (its ordered stop: proxy drains, agent stops replicas, head last) and waits
until every process of the launcher's tree is gone. It signals nothing but a pid whose start time and
command line match the record, so a stale record (a SIGKILLed launcher, a reused pid) is never acted on.

Exit codes of `down`: 0 stopped, 1 it did not stop within --timeout (or may not be signalled), 2 bad
command line or config, 3 no such stack is running (NO_STACK).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import yaml

from runtime import stack_record
from runtime.addresses import bracket_host
from runtime.credentials import state_dir
from runtime.launcher import STOP_GRACE
from runtime.proctree import collect_tree, running
from runtime.stack_config import StackConfig, load_stack

log = logging.getLogger("tokenrelay")

NO_STACK = 3  # `down`: no running stack matches (LSB's "program is not running")
DOWN_MARGIN = 5.0  # seconds `down` waits beyond the launcher's STOP_GRACE (its SIGKILL of what is left)

DEFAULT_STACK = {
    "deployments": [{
        "name": "smollm2", "engine": "vllm", "model": "smollm2", "replicas": 1,
        "engine_args": {"max_model_len": 2048},
    }],
}

ROLES = {"head": "head", "agent": "agent", "proxy": "proxy", "model_proc": "replica"}


def stack_name(config: Optional[str], explicit: Optional[str] = None) -> str:
    """Whose head state a `tokenrelay up` uses: --stack, else one per config file (its name and a hash
    of its absolute path), else "default"; so two configs never share deployments."""
    if explicit:
        return explicit
    if not config:
        return "default"
    path = Path(config).resolve()
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.stem)[:40] or "stack"
    return "%s-%s" % (stem, hashlib.sha256(str(path).encode()).hexdigest()[:8])


def _check_stack_option(ns: argparse.Namespace) -> bool:
    from head.config import STACK_NAME_RE
    if ns.stack is not None and not STACK_NAME_RE.match(ns.stack):
        log.error("--stack must be 1-63 letters, digits, '.', '_' or '-', got %r", ns.stack)
        return False
    return True


def _up_launcher(ns: argparse.Namespace) -> Any:
    """The Launcher class with this command line's stack name, reset flag and proxy address bound in."""
    from runtime.launcher import Launcher
    name = stack_name(ns.config, ns.stack)

    def make(stack: StackConfig, path: Path, log_level: str, **kwargs: Any) -> Any:
        if ns.bind or ns.port:
            host, _, port = stack.proxy_bind.rpartition(":")
            bind = "%s:%s" % (bracket_host(ns.bind) if ns.bind else host, ns.port or port)  # --bind ::1
            stack = dataclasses.replace(stack, proxy_bind=bind)
        log.info("[startup] stack %r (its deployments are kept apart; --stack to name it)", name)
        return Launcher(stack, path, log_level, stack_name=name, reset_deployments=ns.reset_deployments,
                        verbose=ns.verbose, open_api=ns.open_api, **kwargs)
    return make


def cmd_up(ns: argparse.Namespace) -> int:
    if not _check_stack_option(ns):
        return 2
    if ns.port is not None and not 0 < ns.port < 65536:
        log.error("--port must be between 1 and 65535, got %d", ns.port)
        return 2
    Launcher = _up_launcher(ns)
    if ns.config:
        path = Path(ns.config)
        try:
            stack = load_stack(path)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
        return _prepare_and_run(stack, path, ns, Launcher)
    if importlib.util.find_spec("vllm") is None:  # find_spec: importing vllm here would cost ~8 s
        log.error("the vLLM engine is not installed: run `bash scripts/install.sh` (vLLM for this "
                  "machine), or start the mock stack with --config examples/mock.yaml")
        return 1
    # No --config: serve the default real model (SmolLM2-135M-Instruct) with the vLLM engine. The head
    # reads its --config once at start, so the temporary file lives exactly as long as the stack.
    with tempfile.TemporaryDirectory(prefix="tokenrelay-up-") as tmp:
        path = Path(tmp) / "stack.yaml"
        path.write_text(yaml.safe_dump(DEFAULT_STACK))
        return _prepare_and_run(load_stack(path), path, ns, Launcher)


def _prepare_and_run(stack: StackConfig, path: Path, ns: argparse.Namespace, launcher: Any) -> int:
    """Convert known models once before any process starts (so progress shows here), then run."""
    for dep in stack.deployments:
        if dep.engine == "vllm" and not _prepare_in_child(dep.model, ns.log_level):
            return 1
    if (ns.certfile is None) != (ns.keyfile is None):
        log.error("--certfile and --keyfile go together (HTTPS needs both)")
        return 2
    tls = (str(Path(ns.certfile).resolve()), str(Path(ns.keyfile).resolve())) if ns.certfile else None
    if tls:
        from proxy.config import check_tls_pair
        try:
            check_tls_pair(*tls)  # before any process starts (the proxy checks it again)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
    return launcher(stack, path, ns.log_level, insecure=ns.insecure, tls=tls).run()


def _prepare_in_child(model: str, log_level: str) -> bool:
    """Convert a known model in a child process (`tokenrelay models prepare`): torch and transformers
    then never load into the launcher, which stays small for the whole run (~1 GiB less resident)."""
    from runtime.models import KNOWN_MODELS, default_cache_dir, is_prepared
    if model not in KNOWN_MODELS or is_prepared(default_cache_dir(model)):
        return True
    log.info("[startup] preparing model %s (once)", model)
    cmd = [sys.executable, "-m", "runtime", "--log-level", log_level, "models", "prepare", model]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode == 0


def _down_state(ns: argparse.Namespace) -> Path:
    """The state directory `up` used: --state-dir, else the config's head.state_dir, else the default
    ($TOKENRELAY_STATE_DIR, else ~/.local/state/tokenrelay); ValueError for a config that does not load."""
    if ns.state_dir:
        return state_dir(ns.state_dir)
    return state_dir(load_stack(Path(ns.config)).head_state_dir if ns.config else None)


def running_stacks(state: Path) -> list[tuple[stack_record.LauncherRecord, psutil.Process]]:
    """Every stack of this state directory whose launcher runs (stale records left out), by name."""
    found = []
    for path in sorted((state / "stacks").glob("*/" + stack_record.RECORD_FILE)):
        record = stack_record.read(path)
        proc = None if record is None else stack_record.running(record)
        if record is not None and proc is not None:
            found.append((record, proc))
    return found


def _find_stack(ns: argparse.Namespace, state: Path
                ) -> tuple[Optional[tuple[stack_record.LauncherRecord, psutil.Process]], str, int]:
    """(the running stack `down` means, "", 0), or (None, why not, exit code). With neither --config
    nor --stack: the one stack running in the state directory (several: the operator must say which)."""
    if ns.config or ns.stack:
        name = stack_name(ns.config, ns.stack)
        record = stack_record.read(stack_record.record_path(state, name))
        proc = None if record is None else stack_record.running(record)
        if record is None or proc is None:
            stale = " (its launcher, pid %d, is gone: the record is stale)" % record.pid if record else ""
            return None, "no running stack %r in %s%s" % (name, state, stale), NO_STACK
        return (record, proc), "", 0
    stacks = running_stacks(state)
    if len(stacks) == 1:
        return stacks[0], "", 0
    if not stacks:
        return None, ("no running stack in %s (started with another state directory? --state-dir, or "
                      "$TOKENRELAY_STATE_DIR)" % state), NO_STACK
    return None, "%d stacks are running in %s (%s): say which with --stack NAME" % (
        len(stacks), state, ", ".join(r.stack for r, _ in stacks)), 2


def describe(procs: list[psutil.Process]) -> str:
    """What a launcher's tree (procs[0] the launcher) holds, by role: "head, agent, proxy (3 processes),
    2 replicas". A component is a process whose command is `-m head|agent|proxy|model_proc` (or the
    proxy's gunicorn title) and whose parent's is not the same (gunicorn's workers are forks of the
    proxy); its descendants count with it."""
    own: dict[int, Optional[str]] = {}
    parent: dict[int, int] = {}
    for proc in procs:
        try:
            cmd = proc.cmdline()
            parent[proc.pid] = proc.ppid()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        own[proc.pid] = _role(cmd)
    roots: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    for pid in own:
        role, up = own[pid], parent[pid]
        if role is not None and own.get(up) != role:
            roots[role] += 1
        while role is None and up in own:  # a descendant: the nearest component above it
            role, up = own[up], parent[up]
        if role is not None:
            processes[role] += 1
    parts = []
    for role in ("head", "agent", "proxy", "replica"):
        n = roots[role]
        if n:
            label = role if n == 1 else "%d %ss" % (n, role)
            parts.append(label + (" (%d processes)" % processes[role] if processes[role] > n else ""))
    return ", ".join(parts) or "no component left"


def _role(cmd: list[str]) -> Optional[str]:
    if len(cmd) > 2 and cmd[1] == "-m":
        return ROLES.get(cmd[2])
    # gunicorn retitles the proxy's processes after its proc_name (proxy/server.py)
    return "proxy" if cmd and cmd[0].startswith("gunicorn: ") and "[tokenrelay-proxy]" in cmd[0] else None


def cmd_down(ns: argparse.Namespace, clock: Callable[[], float] = time.monotonic) -> int:
    if not _check_stack_option(ns):
        return 2
    try:
        state = _down_state(ns)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    found, why, code = _find_stack(ns, state)
    if found is None:
        log.error("%s", why)
        return code
    record, launcher = found
    tree = collect_tree(launcher.pid)
    what = describe(tree)
    start = clock()
    try:
        launcher.send_signal(signal.SIGTERM)  # psutil checks the start time again: never a reused pid
    except psutil.NoSuchProcess:
        log.error("no running stack %r: its launcher (pid %d) exited just now", record.stack, record.pid)
        return NO_STACK
    except psutil.AccessDenied:
        log.error("not allowed to signal the launcher of stack %r (pid %d): run `tokenrelay down` as the user "
                  "who started it", record.stack, record.pid)
        return 1
    log.info("[shutdown] sent SIGTERM to the launcher of stack %r (pid %d); waiting up to %.0fs",
             record.stack, record.pid, ns.timeout)
    alive = tree
    while alive and clock() - start < ns.timeout:
        time.sleep(0.1)
        alive = [p for p in alive if running(p)]
    if alive:
        log.error("stack %r did not stop within %.0fs: %d process(es) still run (pids %s; launcher pid %d). "
                  "The launcher SIGKILLs what is left %.0fs after SIGTERM; if it is stuck itself, `kill -KILL "
                  "%d` (its children then exit by their parent-death guards)", record.stack, ns.timeout,
                  len(alive), " ".join(str(p.pid) for p in alive[:20]), record.pid, STOP_GRACE, record.pid)
        return 1
    print("stopped stack %r in %.1fs: launcher pid %d, %s; %d process(es) in all"
          % (record.stack, clock() - start, record.pid, what, len(tree)))
    return 0



def add_parsers(sub: Any, seconds: Callable[[str], float]) -> None:
    """The `up` and `down` subcommands (`seconds`: cli's checked --timeout type)."""
    up = sub.add_parser("up", help="start head, agent and proxy on this host")
    up.add_argument("--config", help="stack config (default: serve SmolLM2-135M-Instruct with vLLM)")
    up.add_argument("--certfile", help="serve HTTPS with this PEM certificate (needs --keyfile)")
    up.add_argument("--keyfile", help="the certificate's PEM private key")
    up.add_argument("--insecure", action="store_true",
                    help="plain ZeroMQ sockets, no keys (benchmarks and debugging only; logged loudly)")
    up.add_argument("--stack", default=None, help="name of this stack's head state (default: one per "
                                                  "config file; 'default' without --config)")
    up.add_argument("--reset-deployments", action="store_true",
                    help="replace the stack's stored deployments with the config's (default: the config "
                         "seeds a new stack only; deploy/scale changes are kept across restarts)")
    up.add_argument("--port", type=int, default=None, help="HTTP port of the proxy (default: proxy.bind's)")
    up.add_argument("--verbose", action="store_true",
                    help="stream the replicas' (engines') logs here instead of to per-replica log files")
    up.add_argument("--bind", default=None, help="HTTP address of the proxy (default: proxy.bind's host)")
    up.add_argument("--open-api", action="store_true",
                    help="let a proxy bound beyond loopback serve /v1 without API keys (anyone who reaches "
                         "it can use every model; without keys or this flag such a proxy refuses to start)")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop a stack `tokenrelay up` started (in order, as Ctrl-C does); "
                                       "exit 3 if none runs",
                          description="Stop a running `tokenrelay up` stack on this host: SIGTERM to its "
                                      "launcher (found by its record in the stack's state directory), then wait "
                                      "until every process of it is gone. Exit codes: 0 stopped, 1 not stopped "
                                      "within --timeout, 2 bad command line, %d no such stack runs." % NO_STACK)
    down.add_argument("--config", help="the config the stack was started with (its name and state directory)")
    down.add_argument("--stack", default=None, help="the stack's name (as `up --stack`; default: the config's, "
                                                    "else the one stack running in the state directory)")
    down.add_argument("--state-dir", default=None, help="the state directory (default: the config's "
                                                        "head.state_dir, else $TOKENRELAY_STATE_DIR, else "
                                                        "~/.local/state/tokenrelay)")
    down.add_argument("--timeout", type=seconds, default=STOP_GRACE + DOWN_MARGIN,
                      help="seconds to wait for every process to be gone (default %.0f: the launcher's "
                           "%.0f s stop grace and a margin)" % (STOP_GRACE + DOWN_MARGIN, STOP_GRACE))
    down.set_defaults(func=cmd_down)
