"""agent.processes.AdoptedProcess.verified: a ReplicaHello's pid is a claim the agent checks before it
adopts (and will later signal) that process."""
import os
import subprocess
import sys

from agent.processes import AdoptedProcess


def test_only_the_named_replicas_own_process_is_adopted():
    # argv as `python -m model_proc --replica-id r1 ...` has it (after -c's code: same pairs)
    child = subprocess.Popen([sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()", "-m",
                              "model_proc", "--replica-id", "r1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # it runs its own command line now (right after fork it showed ours)
        adopted = AdoptedProcess.verified(child.pid, "r1")
        assert adopted is not None and adopted.poll() is None
        assert AdoptedProcess.verified(child.pid, "r2") is None  # another replica's claim
        assert AdoptedProcess.verified(os.getpid(), "r1") is None  # not a replica at all
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()
    assert AdoptedProcess.verified(child.pid, "r1") is None  # gone
