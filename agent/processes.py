"""Starting and stopping replica processes (`python -m model_proc`) without blocking the agent's loop.

Runs in the agent process; owns no socket. Each replica runs in its own session (process group) so a
terminal's Ctrl-C reaches the agent, which then stops replicas in order. Stopping is two-phase and
non-blocking: SIGTERM to model_proc now (it stops its own engine processes), SIGKILL to whatever is
left of the tree after the grace period, checked from the agent's loop (`poll_stop`).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import psutil

from runtime.proctree import collect_tree, running, signal_all
from runtime.protocol import ReplicaSpec

log = logging.getLogger(__name__)


class _Tree:
    """Two-phase, non-blocking stop of a process tree; subclasses say how to tell the root ended."""

    pid: int

    def __init__(self) -> None:
        self._stopping_tree: Optional[list[psutil.Process]] = None
        self._kill_at = 0.0

    def poll(self) -> Optional[int]:
        raise NotImplementedError

    def begin_stop(self, grace: float, now: float) -> None:
        if self._stopping_tree is not None:
            return
        # SIGTERM only to model_proc: it shuts its engine down in order (vLLM's engine processes hang
        # when they get SIGTERM at the same time); the whole tree gets SIGKILL after the grace period
        self._stopping_tree = collect_tree(self.pid)
        signal_all(self._stopping_tree[:1], signal.SIGTERM)
        self._kill_at = now + grace

    def poll_stop(self, now: float) -> bool:
        """Advance a stop; True once the whole tree is gone."""
        tree = self._stopping_tree or []
        self.poll()
        alive = [p for p in tree if running(p)]
        if not alive:
            self.kill_group()  # anything of the group the tree missed (re-parented before the stop)
            return True
        if now >= self._kill_at:
            log.warning("[shutdown] replica tree %d ignored SIGTERM; SIGKILL %s", self.pid,
                        [p.pid for p in alive])
            signal_all(alive, signal.SIGKILL)
            self._kill_at = now + 3600  # once
        return False

    def kill_now(self) -> None:
        """Last resort at agent exit: SIGKILL the whole tree."""
        tree = self._stopping_tree or collect_tree(self.pid)
        signal_all(tree, signal.SIGKILL)
        psutil.wait_procs(tree, timeout=2)
        self.poll()
        self.kill_group()

    def kill_group(self) -> bool:
        """SIGKILL what is left of the replica's process group once its main process ended. The group is
        the replica's own session (start_new_session), so it outlives a replica that died abruptly:
        vLLM's EngineCore is then re-parented to init and keeps its memory, cores or GPU (seen after a
        replica was SIGKILLed). Call right after the main process was reaped: its PID cannot be reused
        while the group exists. True if anything was left to kill."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
        return True


class AdoptedProcess(_Tree):
    """A replica started by a previous agent on this host (adopt mode): not our child, so its exit
    code is unknown (reported as -1) and it is watched through psutil."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        try:
            self._proc: Optional[psutil.Process] = psutil.Process(pid)
        except psutil.NoSuchProcess:
            self._proc = None

    def poll(self) -> Optional[int]:
        return None if self._proc is not None and running(self._proc) else -1

    def environ(self) -> dict[str, str]:
        """The process's environment (what its devices are); empty when it cannot be read."""
        try:
            return dict(self._proc.environ()) if self._proc is not None else {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return {}

    @classmethod
    def verified(cls, pid: int, replica_id: str) -> Optional["AdoptedProcess"]:
        """The process, if `pid` runs `-m model_proc --replica-id replica_id`: a hello's pid is only a
        claim, and this agent will signal that process (and its group) when it stops the replica."""
        try:
            cmd = psutil.Process(pid).cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            return None
        pairs = set(zip(cmd, cmd[1:], strict=False))
        if ("-m", "model_proc") not in pairs or ("--replica-id", replica_id) not in pairs:
            return None
        return cls(pid)


class ReplicaProcess(_Tree):
    def __init__(self, spec: ReplicaSpec, host: str, agent_endpoint: str,
                 env: Optional[dict[str, str]] = None, guard: bool = True, log_path: Optional[Path] = None,
                 stack_pid: Optional[int] = None) -> None:
        """`log_path`: append the replica's stdout and stderr there (None: inherit the agent's).
        `guard`: the replica exits with this agent; else (adopt mode) with `stack_pid` if given."""
        super().__init__()
        cmd = [
            sys.executable, "-m", "model_proc",
            "--replica-id", spec.replica_id, "--engine", spec.engine, "--model", spec.model,
            "--engine-args", json.dumps(spec.engine_args),
            "--bind", "tcp://%s:*" % host, "--agent", agent_endpoint,
            "--drain-seconds", str(spec.drain_seconds),
            "--deployment", spec.deployment, "--generation", str(spec.generation),
        ]
        if guard:  # replicas die with their agent (no orphans), unless the agent runs in adopt mode
            cmd += ["--parent-pid", str(os.getpid())]
        elif stack_pid is not None:  # adopt mode under a launcher: outlive the agent, never the stack
            cmd += ["--stack-pid", str(stack_pid)]
        full_env = dict(os.environ)
        full_env.update(env or {})
        out = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "ab")
        try:
            self.popen = subprocess.Popen(cmd, env=full_env, start_new_session=True, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT if out else None)
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        self.pid = self.popen.pid

    def poll(self) -> Optional[int]:
        """Exit code if the main process ended (reaped), else None."""
        return self.popen.poll()

