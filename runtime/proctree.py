"""Stop whole process trees: SIGTERM to every process, a grace period, then SIGKILL.

Runs in the launcher and the agent; owns no socket. vLLM starts its own engine and worker processes, so
stopping a replica must reach its descendants too. The tree is collected before the first signal,
because children of a dead parent are re-parented and can no longer be found from it.
"""
from __future__ import annotations

import logging
import signal
from typing import Iterable

import psutil

log = logging.getLogger(__name__)


def collect_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def stop_tree(pid: int, grace: float) -> list[int]:
    """SIGTERM the tree of `pid`, wait up to `grace` seconds, SIGKILL what is left.

    Returns the pids that had to be killed. Blocks at most `grace` + 1 seconds.
    """
    procs = collect_tree(pid)
    if not procs:
        return []
    # pick up children started between collection and the signal
    procs = _with_new_children(procs)
    signal_all(procs, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    alive = _with_new_children(alive)
    if alive:
        log.warning("[shutdown] %d process(es) of tree %d ignored SIGTERM for %.1fs; killing: %s",
                    len(alive), pid, grace, [p.pid for p in alive])
        signal_all(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=1.0)
    return [p.pid for p in alive]


def _with_new_children(procs: list[psutil.Process]) -> list[psutil.Process]:
    seen = {p.pid for p in procs}
    out = list(procs)
    for proc in procs:
        try:
            for child in proc.children(recursive=True):
                if child.pid not in seen:
                    seen.add(child.pid)
                    out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out
