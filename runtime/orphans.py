"""The descendants a `tokenrelay up` launcher adopts as child subreaper: replicas whose agent died.

Runs in the launcher process; owns no socket. Under `tokenrelay up` the agent runs in adopt mode, so its
replicas outlive it; Linux then re-parents them to the nearest subreaper, the launcher, which must reap
them when they end (else they stay zombies) and stop them with the stack when no agent did. `Orphans`
holds the launcher's own children's pids (subprocess reaps those) and never waits for any other pid
than an orphan's: waiting for "any child" would take a status subprocess still needs.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Callable

import psutil

from runtime.proctree import running, signal_all

log = logging.getLogger(__name__)


class Orphans:
    """The launcher's children that it did not start (`own` gives the pids it did)."""

    def __init__(self, own: Callable[[], set[int]]) -> None:
        self._own = own

    def reap(self) -> None:
        """Collect the exit status of orphans that ended. Peeks first (WNOWAIT) and reaps only a pid we
        did not start; one of ours first in line just waits for the next call (subprocess reaps it)."""
        waitid = getattr(os, "waitid", None)
        if waitid is None:  # no waitid (macOS before Python 3.13): no subreaper there either
            return
        own = self._own()
        while True:
            try:
                info = waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # no children at all
                return
            if info is None or info.si_pid in own:
                return
            try:
                os.waitpid(info.si_pid, 0)  # it has exited: does not block
            except ChildProcessError:
                return

    def running(self) -> list[psutil.Process]:
        """Orphans still running (ended ones are reaped on the way)."""
        self.reap()
        own = self._own()
        out = []
        try:
            children = psutil.Process().children()
        except psutil.NoSuchProcess:
            return []
        for proc in children:
            if proc.pid not in own and running(proc):
                out.append(proc)
        return out

    def stop(self, timeout: float) -> None:
        """SIGTERM the running orphans (each replica drains, then ends its engine), wait up to `timeout`
        seconds, SIGKILL what is left of their trees, and reap them."""
        procs = self.running()
        if procs:
            log.info("[shutdown] stopping %d replica(s) no agent stopped", len(procs))
            signal_all(procs, signal.SIGTERM)
            _, alive = psutil.wait_procs(procs, timeout=max(0.0, timeout))
            if alive:
                log.warning("[shutdown] %d replica(s) did not stop in time; killing them", len(alive))
        for proc in self.running():
            try:
                signal_all([proc] + proc.children(recursive=True), signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(self.running(), timeout=1.0)
        self.reap()
