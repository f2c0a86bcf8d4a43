"""Process-level settings a vLLM replica makes before its engine starts: where vLLM's IPC sockets go, and
which CPU cores the replica runs on.

Runs in model_proc (called by `VllmEngine.start`, before vLLM spawns its engine-core process, which
inherits both). Owns no socket and imports no vLLM. Never touches another process (it only looks whether
the pid in a leftover directory's name is alive).

- IPC: vLLM binds its ZeroMQ IPC sockets under VLLM_RPC_BASE_PATH (default: the shared temp dir) and never
  removes them (~7 files per engine start). Unless the operator set it, each replica gets a private
  directory, removed when the replica exits (or, if it was killed, by the next replica on the host).
- Cores: the agent gives each CPU replica its cores in VLLM_CPU_OMP_THREADS_BIND. vLLM applies that only
  to the worker process of its multiprocess executor; with VLLM_ENABLE_V1_MULTIPROCESSING=0 (one engine
  process, ~10 s faster start) it is silently ignored and every replica's threads float over every core.
  Pinning the whole replica (each thread of this process; new threads and child processes inherit the
  mask) makes the assignment hold in both layouts.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Mapping, MutableMapping, Optional

from runtime.owned_dirs import owned_temp_dir

log = logging.getLogger(__name__)

RPC_DIR_ENV = "VLLM_RPC_BASE_PATH"
RPC_DIR_PREFIX = "tokenrelay-vllm-rpc-"  # then the replica's pid
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_NOT_A_CORE_LIST = ("", "auto", "nobind", "all")


def use_private_rpc_dir(environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Point VLLM_RPC_BASE_PATH at a new private directory unless it is set; returns the new directory.

    Set once per process (vLLM caches its environment once an engine is up); the directory is removed
    at exit by the process that created it (vLLM's children run atexit handlers too). A replica that was
    SIGKILLed cannot do that: the directory carries its pid, and the next replica removes those of dead
    processes.
    """
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    if env.get(RPC_DIR_ENV):
        return None
    remove_stale_rpc_dirs(tempfile.gettempdir())
    path = owned_temp_dir("%s%d-" % (RPC_DIR_PREFIX, os.getpid()))
    env[RPC_DIR_ENV] = path
    return path


def remove_stale_rpc_dirs(parent: str) -> list[str]:
    """Remove the private IPC directories in `parent` whose replica process is gone; returns them."""
    removed = []
    for name in os.listdir(parent):
        pid_text = name[len(RPC_DIR_PREFIX):].split("-", 1)[0]
        if not name.startswith(RPC_DIR_PREFIX) or not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def parse_core_list(value: str) -> Optional[set[int]]:
    """Cores named by a VLLM_CPU_OMP_THREADS_BIND value ("0-1", "0,2-3", "0-1|2-3" per rank).

    None for the values that name no cores (unset, "auto", "nobind", "all"); ValueError naming the
    variable for anything else that is not a core list.
    """
    text = value.strip()
    if text in _NOT_A_CORE_LIST:
        return None
    cores: set[int] = set()
    try:
        for part in text.replace("|", ",").split(","):
            low, dash, high = part.strip().partition("-")
            first, last = int(low), int(high) if dash else int(low)
            if first < 0 or last < first:
                raise ValueError(part)
            cores.update(range(first, last + 1))
    except ValueError:
        raise ValueError("%s=%r is not a core list like 0-3 or 0,2 (or auto, nobind)"
                         % (BIND_ENV, value)) from None
    return cores


def pin_to_assigned_cores(environ: Optional[Mapping[str, str]] = None) -> Optional[set[int]]:
    """Restrict every thread of this process to the cores in VLLM_CPU_OMP_THREADS_BIND.

    Returns the cores, or None when the variable names none or the OS cannot pin (not Linux). A core
    list this process may not run on is a ValueError naming the variable.
    """
    environ = os.environ if environ is None else environ
    cores = parse_core_list(environ.get(BIND_ENV, ""))
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if not cores <= allowed:
        raise ValueError("%s=%s names cores outside this process's CPU set %s"
                         % (BIND_ENV, environ[BIND_ENV], sorted(allowed)))
    for task in os.listdir("/proc/self/task"):  # sched_setaffinity(0) would pin the calling thread only
        try:
            os.sched_setaffinity(int(task), cores)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile
    log.info("vllm_engine [startup] pinned to cores %s (%s)", sorted(cores), BIND_ENV)
    return cores
