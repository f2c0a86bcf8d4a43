"""Parent-death guard: a child process must not outlive the process that started it.

Runs in model_proc, head, agent and proxy when started by a supervisor; owns no socket.
Linux delivers PR_SET_PDEATHSIG when the parent dies; `parent_alive` covers the race where the parent
died before the guard was installed, and non-Linux systems (callers poll it from their loops).
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    """Linux prctl(option, value); logs instead of raising, as every caller goes on without it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(option, value, 0, 0, 0) != 0:
            log.warning("prctl(%d) failed: errno %d", option, ctypes.get_errno())
    except (OSError, AttributeError) as exc:  # no libc symbol: callers fall back to polling
        log.warning("prctl(%d) unavailable: %s", option, exc)


def become_subreaper() -> None:
    """Linux: orphaned descendants (a crashed agent's replicas) become our children, not init's, so a
    launcher still holds them and can stop them (runtime.orphans). Elsewhere nothing changes."""
    if sys.platform.startswith("linux"):
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def install(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` when our parent dies; exit at once if it is already gone."""
    if sys.platform.startswith("linux"):
        _prctl(_PR_SET_PDEATHSIG, int(sig))
    if not parent_alive(parent_pid):
        log.error("[shutdown] parent %d is gone before start; exiting", parent_pid)
        os._exit(1)


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs (not necessarily our parent; a zombie, dead but not yet
    reaped by its own parent, does not count). Polled often, so a pid reused by the system in between
    is a negligible risk."""
    if _HAS_PROC:
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                stat = f.read()
        except OSError:  # gone
            return False
        end = stat.rindex(b")")  # the command name may hold spaces and parentheses
        return stat[end + 2:end + 3] not in (b"Z", b"X")
    try:  # no /proc: existence is all we can tell
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


_HAS_PROC = os.path.exists("/proc/self/stat")
