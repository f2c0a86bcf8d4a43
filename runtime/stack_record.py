"""The launcher record of a running `tokenrelay up` stack: STATE_DIR/stacks/NAME/launcher.json.

Runs in the launcher (writes it once its signal handlers are in place, removes it after its shutdown)
and in the CLI (`tokenrelay down` reads it, and so does a second `tokenrelay up` of the same stack);
owns no socket. It is what lets an operator stop a stack started in the background (nohup, systemd,
tmux) without looking for the launcher's pid.

A record is only a claim: a SIGKILLed launcher leaves its record behind, and the pid in it may since
run another program. So a record is believed only while its pid runs a process with the recorded start
time and command line (`running`); one that fails that check is stale: `down` reports no running stack
and a later `up` writes over it. The file is written to a temporary name and renamed over the old one,
so a reader never sees half a record. It must never be used to signal a process `running` did not
return.

Two `up`s of one stack started at the same instant could both find no live record; so a launcher also
holds an exclusive lock on STATE_DIR/stacks/NAME/launcher.lock (`hold_lock`) for its whole life, taken
before it looks at the record. The kernel drops the lock when the launcher's process ends, however it
ends, and its children do not inherit it.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

import msgspec
import psutil

log = logging.getLogger(__name__)

RECORD_FILE = "launcher.json"
LOCK_FILE = "launcher.lock"
START_TIME_SLACK = 0.05  # seconds; psutil derives a start time from clock ticks and the boot time


class LauncherRecord(msgspec.Struct, frozen=True):
    """What a launcher writes about itself at start."""
    pid: int
    create_time: float  # psutil's, of the launcher process: with the pid, it names one process
    cmdline: list[str]
    stack: str
    started_at: float  # wall clock (time.time), for messages only
    proxy: str = ""  # the proxy's HTTP address, for messages only
    head: str = ""  # the head's control endpoint as this host reaches it: the CLI's --head when not given


def stack_dir(state: Path, stack: Optional[str]) -> Path:
    """Where a stack's own state lives (its head.db, logs, agent socket, launcher record)."""
    return state / "stacks" / stack if stack else state


def record_path(state: Path, stack: Optional[str]) -> Path:
    return stack_dir(state, stack) / RECORD_FILE


def hold_lock(path: Path) -> Optional[int]:
    """Take the stack's launcher lock (a file next to the record) for this process's life: its file
    descriptor, or None when another process holds it. Raises OSError when the file cannot be made."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def this_process(stack: str, proxy: str = "", head: str = "") -> LauncherRecord:
    """The record of the calling process (the launcher)."""
    me = psutil.Process()
    return LauncherRecord(pid=me.pid, create_time=me.create_time(), cmdline=me.cmdline(), stack=stack,
                          started_at=time.time(), proxy=proxy, head=head)


def write(path: Path, record: LauncherRecord) -> None:
    """Write atomically: a temporary file in the same directory, renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("%s.%d.tmp" % (path.name, os.getpid()))
    with open(tmp, "wb") as fh:
        fh.write(msgspec.json.encode(record))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read(path: Path) -> Optional[LauncherRecord]:
    """The record at `path`, or None: no file, or one that is not a record (logged; treated as stale)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the launcher record %s: %s", path, exc.strerror)
        return None
    try:
        return msgspec.json.decode(data, type=LauncherRecord)
    except msgspec.DecodeError as exc:
        log.warning("ignoring %s: not a launcher record (%s)", path, exc)
        return None


def running(record: LauncherRecord) -> Optional[psutil.Process]:
    """The launcher the record names, if it still runs: the pid's process must have the recorded start
    time and command line (a reused pid has neither). None for a stale record."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > START_TIME_SLACK:
            return None
        if proc.cmdline() != record.cmdline or proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None
    return proc


def remove(path: Path, pid: int) -> None:
    """Remove the record if it is the one process `pid` wrote (never another launcher's)."""
    record = read(path)
    if record is not None and record.pid == pid:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
