"""A replica that dies abruptly must not leave its engine processes running (agent/processes.py).

vLLM's EngineCore is a child of model_proc; when model_proc is SIGKILLed the child is re-parented to
init and kept its memory and cores (found after tests killed replicas). The agent starts every replica
in its own session and, once the main process is reaped, kills what is left of that process group.
Real processes: a parent in a new session with a child that ignores its parent's death, like an engine.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from agent.processes import _Tree

pytestmark = pytest.mark.integration

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


class _Replica(_Tree):
    def __init__(self) -> None:
        super().__init__()
        self.popen = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True,
                                      stdout=subprocess.PIPE, text=True)
        self.pid = self.popen.pid
        self.child_pid = int(self.popen.stdout.readline())

    def poll(self):
        return self.popen.poll()

    def cleanup(self) -> None:
        """Whatever a failed test left running."""
        for pid in (self.child_pid, self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.stdout.close()


def _gone(pid: int, timeout: float = 5.0) -> bool:
    try:
        proc = psutil.Process(pid)
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def test_the_engine_child_of_a_killed_replica_is_killed_with_its_group():
    rep = _Replica()
    try:
        os.kill(rep.pid, signal.SIGKILL)
        rep.popen.wait(5)
        assert psutil.Process(rep.child_pid).is_running()  # orphaned, still running: what the agent saw
        assert rep.kill_group() is True
        assert _gone(rep.child_pid)
        assert rep.kill_group() is False  # nothing left
    finally:
        rep.cleanup()


def test_an_orderly_stop_leaves_nothing_of_the_group():
    rep = _Replica()
    try:
        rep.begin_stop(grace=0.2, now=time.monotonic())
        deadline = time.monotonic() + 10
        while not rep.poll_stop(time.monotonic()):
            assert time.monotonic() < deadline
            time.sleep(0.05)  # polling another process's exit
        assert _gone(rep.child_pid)
    finally:
        rep.cleanup()
