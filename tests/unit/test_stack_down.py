"""`tokenrelay down`'s pure parts and the launcher record (runtime.stack_record, runtime.stack_commands):
a record is believed only for the very process that wrote it, `down` with no running stack exits 3, and
`up` refuses a stack whose launcher runs. No process is signalled here (tests/integration does that)."""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import psutil
import pytest

import runtime.launcher
from runtime import cli, stack_record
from runtime.launcher import Launcher, stop_signals
from runtime.stack_commands import NO_STACK, describe
from runtime.stack_config import StackConfig

NO_SUCH_PID = 2**22 + 7  # above Linux's largest pid_max


def own_record(stack: str = "s") -> stack_record.LauncherRecord:
    return stack_record.this_process(stack, "127.0.0.1:8000")


def test_a_record_is_written_whole_and_read_back(tmp_path: Path) -> None:
    path = stack_record.record_path(tmp_path, "s")
    record = own_record()
    stack_record.write(path, record)
    assert stack_record.read(path) == record
    assert [p.name for p in path.parent.iterdir()] == ["launcher.json"]  # no temporary file left
    assert path == tmp_path / "stacks" / "s" / "launcher.json"
    path.write_text("{half a rec")
    assert stack_record.read(path) is None  # not a record: treated as stale, never as a pid


def test_a_record_names_only_the_process_that_wrote_it() -> None:
    record = own_record()
    proc = stack_record.running(record)
    assert proc is not None and proc.pid == os.getpid()
    reused = stack_record.LauncherRecord(pid=os.getpid(), create_time=record.create_time - 5.0,
                                         cmdline=record.cmdline, stack="s", started_at=0.0)
    assert stack_record.running(reused) is None  # same pid, another process (pid reuse)
    other_program = stack_record.LauncherRecord(pid=os.getpid(), create_time=record.create_time,
                                                cmdline=["sleep", "100"], stack="s", started_at=0.0)
    assert stack_record.running(other_program) is None
    gone = stack_record.LauncherRecord(pid=NO_SUCH_PID, create_time=0.0, cmdline=[], stack="s", started_at=0.0)
    assert stack_record.running(gone) is None


def test_a_launcher_removes_only_its_own_record(tmp_path: Path) -> None:
    path = stack_record.record_path(tmp_path, "s")
    stack_record.write(path, own_record())
    stack_record.remove(path, os.getpid() + 1)  # another launcher's stop: not its record
    assert path.exists()
    stack_record.remove(path, os.getpid())
    assert not path.exists()
    stack_record.remove(path, os.getpid())  # gone already: nothing to do


def test_sighup_stops_the_stack_unless_it_was_ignored_on_entry() -> None:
    """A closed terminal stops the stack in order; `nohup tokenrelay up` keeps ignoring SIGHUP."""
    old = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        assert stop_signals() == [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        assert stop_signals() == [signal.SIGINT, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGHUP, old)


def test_up_refuses_a_stack_whose_launcher_runs_and_ignores_a_stale_record(tmp_path, monkeypatch, caplog):
    state = tmp_path / "state"
    stack = StackConfig(head_state_dir=str(state))
    path = stack_record.record_path(state, "prod")
    stack_record.write(path, own_record("prod"))  # this process plays the running launcher
    monkeypatch.setattr(Launcher, "_spawn", lambda *a: pytest.fail("started a process"))
    monkeypatch.setattr(Launcher, "bind_problems", lambda self: pytest.fail("got past the record"))
    with caplog.at_level(logging.ERROR):
        assert Launcher(stack, Path("x.yaml"), stack_name="prod").run() == 1
    assert "stack 'prod' is already running (launcher pid %d" % os.getpid() in caplog.text
    assert "`tokenrelay down --stack prod --state-dir %s` stops it" % state in caplog.text
    # a SIGKILLed launcher's record (its pid now another process's) does not stop the next `up`
    stack_record.write(path, stack_record.LauncherRecord(pid=os.getpid(), create_time=1.0, cmdline=["x"],
                                                         stack="prod", started_at=0.0))
    monkeypatch.setattr(Launcher, "bind_problems", lambda self: ["proxy.bind 127.0.0.1:1: in use"])
    caplog.clear()
    assert Launcher(stack, Path("x.yaml"), stack_name="prod").run() == 1
    assert "cannot listen on proxy.bind" in caplog.text and "already running" not in caplog.text


def test_two_ups_of_one_stack_at_the_same_instant_start_it_once(tmp_path, monkeypatch, caplog):
    """Both could find no live record; the launcher lock (held by the first for its whole life, dropped
    by the kernel when it ends) refuses the second before it reads the record."""
    import subprocess
    import sys

    state = tmp_path / "state"
    lock = stack_record.record_path(state, "prod").with_name(stack_record.LOCK_FILE)
    assert stack_record.hold_lock(lock) is not None  # the first launcher (this process) holds it
    holder = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                             "from runtime import stack_record; "
                             "sys.exit(0 if stack_record.hold_lock(Path(sys.argv[1])) is None else 1)", str(lock)],
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    assert holder.returncode == 0  # another process cannot take it
    monkeypatch.setattr(Launcher, "already_running", lambda self: None)  # no record written yet
    monkeypatch.setattr(Launcher, "bind_problems", lambda self: pytest.fail("got past the lock"))
    with caplog.at_level(logging.ERROR):
        assert Launcher(StackConfig(head_state_dir=str(state)), Path("x.yaml"), stack_name="prod").run() == 1
    assert "is being started by another `tokenrelay up`" in caplog.text


def test_down_without_a_running_stack_exits_3_saying_so(tmp_path, capsys) -> None:
    state = tmp_path / "state"
    assert cli.main(["down", "--state-dir", str(state)]) == NO_STACK
    assert "no running stack in %s" % state in capsys.readouterr().err
    stale = stack_record.LauncherRecord(pid=NO_SUCH_PID, create_time=1.0, cmdline=["x"], stack="prod",
                                        started_at=0.0)
    stack_record.write(stack_record.record_path(state, "prod"), stale)
    assert cli.main(["down", "--stack", "prod", "--state-dir", str(state)]) == NO_STACK
    assert "no running stack 'prod' in %s (its launcher, pid %d, is gone: the record is stale)" % (
        state, NO_SUCH_PID) in capsys.readouterr().err
    assert cli.main(["down", "--state-dir", str(state)]) == NO_STACK  # a stale record is no running stack


def test_down_finds_the_stack_by_its_config_and_refuses_to_guess_between_two(tmp_path, capsys) -> None:
    state = tmp_path / "state"
    config = tmp_path / "mock.yaml"
    config.write_text("head: {state_dir: %s}\ndeployments: []\n" % state)
    assert cli.main(["down", "--config", str(config)]) == NO_STACK
    out = capsys.readouterr().err
    assert "no running stack 'mock-" in out and str(state) in out  # the config's state dir
    for name in ("a", "b"):  # this process plays two running launchers: neither is signalled
        stack_record.write(stack_record.record_path(state, name), own_record(name))
    assert cli.main(["down", "--state-dir", str(state)]) == 2
    assert "2 stacks are running in %s (a, b): say which with --stack NAME" % state in capsys.readouterr().err
    assert cli.main(["down", "--stack", "../etc"]) == 2
    assert cli.main(["down", "--config", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "x"])
def test_down_checks_its_timeout(timeout: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["down", "--timeout", timeout])
    assert info.value.code == 2 and "--timeout" in capsys.readouterr().err


class FakeProc:
    def __init__(self, pid: int, ppid: int, cmd: str) -> None:
        # a gunicorn title is one argument padded with empty ones (setproctitle), as psutil reads it
        self.pid, self._ppid = pid, ppid
        self._cmd = [cmd, "", ""] if cmd.startswith("gunicorn: ") else cmd.split()

    def cmdline(self) -> list[str]:
        if not self._cmd:
            raise psutil.NoSuchProcess(self.pid)
        return self._cmd

    def ppid(self) -> int:
        return self._ppid


def test_down_says_what_it_stopped_by_component() -> None:
    tree = [FakeProc(1, 0, "python -m runtime up --config x"),
            FakeProc(2, 1, "python -m head --control x"), FakeProc(3, 1, "python -m agent --head x"),
            FakeProc(4, 1, "python -m proxy --head x"), FakeProc(5, 4, "python -m proxy --head x"),
            FakeProc(6, 4, "gunicorn: worker [tokenrelay-proxy]"),  # retitled by gunicorn
            FakeProc(7, 3, "python -m model_proc --replica-id r1"), FakeProc(8, 7, "python -c spawn"),
            FakeProc(9, 1, "python -m model_proc --replica-id r2"),  # adopted: the launcher's child
            FakeProc(10, 3, "")]  # gone meanwhile
    assert describe(tree) == "head, agent, proxy (3 processes), 2 replicas (3 processes)"  # type: ignore[arg-type]
    assert describe(tree[:1]) == "no component left"  # type: ignore[arg-type]
    retitled = [tree[0], FakeProc(4, 1, "gunicorn: master [tokenrelay-proxy]")]
    assert describe(retitled) == "proxy"  # type: ignore[arg-type]


def test_the_launcher_record_path_matches_what_down_reads(tmp_path) -> None:
    launcher = runtime.launcher.Launcher(StackConfig(head_state_dir=str(tmp_path)), Path("x.yaml"),
                                         stack_name="prod")
    assert launcher.record_path() == stack_record.record_path(tmp_path, "prod")
    assert launcher.replica_log_dir() == tmp_path / "stacks" / "prod" / "logs"
    assert launcher.down_command() == "tokenrelay down --stack prod --state-dir %s" % tmp_path


def test_admin_commands_find_the_running_stacks_head_without_head(tmp_path, monkeypatch, capsys) -> None:
    """docs/operations.md: `nohup tokenrelay up --config stack.yaml &` then `tokenrelay status`. With the
    head on other ports than 7100, status asked tcp://127.0.0.1:7100 (another stack's head, or none)."""
    from runtime import head_client
    asked: list[str] = []

    def status(endpoint: str, token: str, **kwargs: object) -> None:
        asked.append(endpoint)
        raise head_client.HeadUnreachable("no answer")

    monkeypatch.setattr(head_client, "status", status)
    monkeypatch.setattr(cli, "_token", lambda ns: "t")
    args = ["status", "--state-dir", str(tmp_path)]
    assert cli.main(args) == 1 and asked == [cli.DEFAULT_HEAD]  # no stack runs: the default
    record = stack_record.this_process("mine", "127.0.0.1:8300", "tcp://127.0.0.1:7300")
    stack_record.write(stack_record.record_path(tmp_path, "mine"), record)
    assert cli.main(args) == 1 and asked[-1] == "tcp://127.0.0.1:7300"  # the one stack running
    assert cli.main(args + ["--head", "tcp://127.0.0.1:7555"]) == 1 and asked[-1] == "tcp://127.0.0.1:7555"
    other = stack_record.this_process("other", "127.0.0.1:8400", "tcp://127.0.0.1:7400")
    stack_record.write(stack_record.record_path(tmp_path, "other"), other)
    capsys.readouterr()
    assert cli.main(args) == 1 and len(asked) == 3  # two: no guess, nothing sent
    err = capsys.readouterr().err
    assert "2 stacks are running" in err and "say which head with --head" in err
    assert "mine: tcp://127.0.0.1:7300" in err and "other: tcp://127.0.0.1:7400" in err
