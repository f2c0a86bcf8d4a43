"""The operator's stop of a single-host stack: `tokenrelay down` (a stack started in the background) and
SIGHUP (its terminal closed). Both stop it in order, as Ctrl-C does: an in-flight stream ends cleanly,
and no process of the stack is left. `down` signals only the launcher its record names."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from runtime import stack_record
from tests.integration.stack import ROOT, Stack, wait_for

pytestmark = pytest.mark.integration

MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 2,
        "engine_args": {"ttft_ms": 20, "itl_ms": 50, "tokens": 40}}


def tokenrelay(*args: str, timeout: float = 40.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=timeout)


def leftovers(tree: list[psutil.Process]) -> list[str]:
    """"pid command" of the processes still alive (zombies are gone: PID 1 reaps them)."""
    _, alive = psutil.wait_procs(tree, timeout=1.0)
    left = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append("%d %s" % (p.pid, " ".join(p.cmdline()[:4])))
        except psutil.NoSuchProcess:
            pass
    return left


def signal_mask(pid: int, field: str) -> int:
    """SigIgn or SigCgt of /proc/PID/status: bit N-1 set for signal N ignored or caught."""
    for line in open("/proc/%d/status" % pid):
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


class Stream(threading.Thread):
    """One streaming completion, read to its end: its text chunks and whether it ended with [DONE]."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.url = base_url + "/v1/completions"
        self.chunks: list[dict] = []
        self.done = False
        self.error: object = None

    def run(self) -> None:
        body = {"model": "mock", "prompt": "hang up", "max_tokens": 40, "stream": True}
        try:
            with httpx.stream("POST", self.url, json=body, timeout=20) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.chunks.append(json.loads(line[6:]))
        except httpx.HTTPError as exc:
            self.error = exc


def test_down_stops_a_background_stack_in_order_and_then_says_none_runs(tmp_path) -> None:
    s = Stack(tmp_path, [MOCK], workers=1).start()
    tree = s.tree()
    record = s.state_dir / "stacks"
    try:
        [path] = record.glob("*/launcher.json")
        assert stack_record.read(path).pid == s.proc.pid
        stream = Stream(s.base_url)
        stream.start()
        wait_for(lambda: len(stream.chunks) >= 3, 10, "the stream's first tokens")
        down = tokenrelay("down", "--config", str(s.config_path))
        assert down.returncode == 0, down.stderr
        assert s.proc.wait(5) == 0  # down returns once the launcher is gone
    finally:
        s.stop()
    stream.join(10)
    assert "stopped stack 'stack-" in down.stdout and "launcher pid %d, head, agent, proxy" % s.proc.pid \
        in down.stdout and "2 replicas" in down.stdout, down.stdout
    assert leftovers(tree) == []
    assert stream.done and not any("error" in c for c in stream.chunks), stream.chunks[-2:]  # the proxy drained it
    assert [c["choices"][0]["finish_reason"] for c in stream.chunks].count("length") == 1  # all 40 tokens
    assert not path.exists()  # the launcher removed its record
    log = s.log()
    assert "[shutdown] SIGTERM: stopping the stack" in log and "[shutdown] stack stopped" in log
    again = tokenrelay("down", "--state-dir", str(s.state_dir))
    assert again.returncode == 3 and "no running stack in %s" % s.state_dir in again.stderr, again.stderr


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_sighup_stops_the_stack_in_order(tmp_path) -> None:
    """A closed terminal: the stream in flight still ends with [DONE], nothing is left."""
    s = Stack(tmp_path, [MOCK], workers=1)
    s.preexec_fn = lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)  # even if pytest runs under nohup
    s.start()
    tree = s.tree()
    stream = Stream(s.base_url)
    try:
        stream.start()
        wait_for(lambda: len(stream.chunks) >= 3, 10, "the stream's first tokens")
        assert signal_mask(s.proc.pid, "SigCgt") & (1 << (signal.SIGHUP - 1))  # the launcher handles it
        s.proc.send_signal(signal.SIGHUP)
        assert s.proc.wait(15) == 0
    finally:
        s.stop()
    stream.join(10)
    assert leftovers(tree) == []
    assert stream.done and not any("error" in c for c in stream.chunks), stream.chunks[-2:]
    assert [c["choices"][0]["finish_reason"] for c in stream.chunks].count("length") == 1
    assert "[shutdown] SIGHUP: stopping the stack" in s.log()


def test_down_reports_a_launcher_that_does_not_stop_and_leaves_it_alone(tmp_path) -> None:
    """A launcher that ignores SIGTERM (stuck): `down` waits --timeout, exits 1 naming it, kills nothing."""
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)")
    stuck = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert stuck.stdout.readline() == "ready\n"
        proc = psutil.Process(stuck.pid)
        record = stack_record.LauncherRecord(pid=stuck.pid, create_time=proc.create_time(), cmdline=proc.cmdline(),
                                             stack="stuck", started_at=time.time())
        stack_record.write(stack_record.record_path(tmp_path, "stuck"), record)
        down = tokenrelay("down", "--stack", "stuck", "--state-dir", str(tmp_path), "--timeout", "1")
        assert down.returncode == 1, down.stderr
        assert "stack 'stuck' did not stop within 1s: 1 process(es) still run (pids %d" % stuck.pid in down.stderr
        assert "kill -KILL %d" % stuck.pid in down.stderr
        assert stuck.poll() is None  # down never escalates on its own
    finally:
        stuck.kill()
        stuck.wait(5)
    gone = tokenrelay("down", "--stack", "stuck", "--state-dir", str(tmp_path))  # its record is stale now
    assert gone.returncode == 3 and "the record is stale" in gone.stderr, gone.stderr


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_under_nohup_sighup_stays_ignored_and_down_finds_the_stack_by_name(tmp_path) -> None:
    """`nohup tokenrelay up` asked to outlive its terminal: the launcher leaves SIGHUP ignored."""
    s = Stack(tmp_path, [dict(MOCK, replicas=1)], workers=1)
    s.preexec_fn = lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does
    s.start()
    tree = s.tree()
    try:
        hup = 1 << (signal.SIGHUP - 1)
        assert signal_mask(s.proc.pid, "SigIgn") & hup and not signal_mask(s.proc.pid, "SigCgt") & hup
        assert signal_mask(s.proc.pid, "SigCgt") & (1 << (signal.SIGTERM - 1))
        [path] = (s.state_dir / "stacks").glob("*/launcher.json")
        down = tokenrelay("down", "--stack", path.parent.name, "--state-dir", str(s.state_dir))
        assert down.returncode == 0, down.stderr
        assert s.proc.wait(5) == 0
    finally:
        s.stop()
    assert leftovers(tree) == []
