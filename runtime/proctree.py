"""Process trees: collect one, signal all of it (the agent and the launcher run SIGTERM, grace, SIGKILL).

Runs in the launcher and the agent; owns no socket. vLLM starts its own engine and worker processes, so
stopping a replica must reach its descendants too. The tree is collected before the first signal,
because children of a dead parent are re-parented and can no longer be found from it.
"""
from __future__ import annotations

from typing import Iterable

import psutil


def collect_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def running(proc: psutil.Process) -> bool:
    """Whether the process runs: not gone, its pid not reused (psutil compares its start time), and not
    a zombie (dead, not yet reaped by its parent). runtime.parent_guard.process_alive asks the same of
    a bare pid, without psutil, for a check made every second."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


def signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
