"""runtime.parent_guard.process_alive: what a replica that outlives its agent watches (its stack's launcher)."""
import os
import subprocess
import sys

from runtime.parent_guard import process_alive


def test_a_running_process_is_alive_and_an_ended_one_is_not_even_before_it_is_reaped():
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert process_alive(child.pid)
        child.stdin.close()  # it exits; we do not reap it yet: a zombie, as a killed launcher can be
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # until it has exited (no reaping)
        assert not process_alive(child.pid)
    finally:
        child.wait()
    assert not process_alive(child.pid)
