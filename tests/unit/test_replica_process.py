"""model_proc's process entry: command-line config and the choice of event loop (no sockets)."""
import asyncio

import pytest

import model_proc.__main__ as entry
from model_proc.config import EXIT_USAGE, ReplicaConfig, config_from_args


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_event_loop_flag_defaults_to_auto_and_is_checked(capsys):
    assert config_from_args(["--replica-id", "r1"]).event_loop == "auto"
    assert config_from_args(["--replica-id", "r1", "--event-loop", "asyncio"]).event_loop == "asyncio"
    with pytest.raises(SystemExit) as exc:
        config_from_args(["--replica-id", "r1", "--event-loop", "trio"])
    assert exc.value.code == 2 and "--event-loop" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--event-loop"):
        ReplicaConfig("r1", "mock", "m", event_loop="tornado")


def test_auto_runs_on_uvloop_when_installed_and_asyncio_on_request():
    pytest.importorskip("uvloop")
    assert entry._run(_loop_module(), "auto").startswith("uvloop")
    assert entry._run(_loop_module(), "uvloop").startswith("uvloop")
    assert entry._run(_loop_module(), "asyncio").startswith("asyncio")


def test_without_uvloop_auto_falls_back_and_an_explicit_uvloop_is_a_usage_error(monkeypatch, caplog):
    real = entry.importlib.import_module

    def no_uvloop(name, *args):
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real(name, *args)

    monkeypatch.setattr(entry.importlib, "import_module", no_uvloop)
    assert entry._run(_loop_module(), "auto").startswith("asyncio")
    coro = _loop_module()
    assert entry._run(coro, "uvloop") == EXIT_USAGE
    assert coro.cr_frame is None  # closed, not left un-awaited
    assert "uvloop is not installed" in caplog.text


def test_a_replica_that_may_outlive_its_agent_still_watches_its_stack():
    cfg = config_from_args(["--replica-id", "r1", "--stack-pid", "4242"])
    assert (cfg.parent_pid, cfg.stack_pid) == (None, 4242)
    assert config_from_args(["--replica-id", "r1", "--parent-pid", "7"]).stack_pid is None
