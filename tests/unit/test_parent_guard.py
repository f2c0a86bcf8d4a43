"""runtime.parent_guard.process_alive (what a replica that outlives its agent watches: its stack's launcher)
and runtime.proctree.running (what the agent and the launcher ask of the processes they hold)."""
import os
import subprocess
import sys

import psutil

from runtime.parent_guard import process_alive
from runtime.proctree import running


def test_a_running_process_is_alive_and_an_ended_one_is_not_even_before_it_is_reaped():
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    proc = psutil.Process(child.pid)
    try:
        assert process_alive(child.pid) and running(proc)
        child.stdin.close()  # it exits; we do not reap it yet: a zombie, as a killed launcher can be
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # until it has exited (no reaping)
        assert not process_alive(child.pid) and not running(proc)
    finally:
        child.wait()
    assert not process_alive(child.pid) and not running(proc)
