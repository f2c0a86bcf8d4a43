"""`python -m head`'s command line, derived from HeadConfig's fields (runtime.settings)."""
from __future__ import annotations

import pytest

from head.config import HeadConfig, config_from_args

pytestmark = pytest.mark.unit


def test_no_arguments_give_the_dataclass_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENRELAY_INSECURE", raising=False)
    assert config_from_args([]) == HeadConfig()


def test_every_flag_the_launcher_and_operators_pass_reaches_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENRELAY_INSECURE", raising=False)
    cfg = config_from_args([
        "--control", "tcp://127.0.0.1:9100", "--publish", "ipc:///tmp/pub", "--config", "stack.yaml",
        "--agent-timeout", "5", "--recovery-grace", "0.5", "--state-dir", "/s", "--no-persist",
        "--parent-pid", "42", "--curve-dir", "/k", "--metrics-port", "-1", "--metrics-host", "0.0.0.0",
        "--prometheus-sd-file", "/sd.json", "--proxy-metrics", "h1:8000, h2:8000,", "--log-level", "DEBUG",
        "--insecure", "--stack", "blue", "--reset-deployments"])
    assert cfg == HeadConfig(
        control="tcp://127.0.0.1:9100", publish="ipc:///tmp/pub", config_file="stack.yaml", agent_timeout=5.0,
        recovery_grace=0.5, state_dir="/s", persist=False, parent_pid=42, curve_dir="/k", metrics_port=-1,
        metrics_host="0.0.0.0", prometheus_sd_file="/sd.json", proxy_metrics=("h1:8000", "h2:8000"),
        log_level="DEBUG", insecure=True, stack="blue", reset_deployments=True)


@pytest.mark.parametrize("text, insecure", [("1", True), ("0", False)])
def test_tokenrelay_insecure_in_the_environment_counts_like_the_flag(
        text: str, insecure: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_INSECURE", text)
    assert config_from_args([]).insecure is insecure


def test_a_bad_tokenrelay_insecure_exits_2_naming_it(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOKENRELAY_INSECURE", "maybe")
    with pytest.raises(SystemExit) as exc:
        config_from_args([])
    assert exc.value.code == 2 and "TOKENRELAY_INSECURE" in capsys.readouterr().err
    assert config_from_args(["--insecure"]).insecure  # the flag settles it without reading the variable


@pytest.mark.parametrize("argv, knob", [
    (["--control", "localhost:7100"], "--control"),
    (["--agent-timeout", "0"], "--agent-timeout"),
    (["--agent-timeout", "soon"], "--agent-timeout"),
    (["--stack", "../etc"], "--stack"),
    (["--stack", "blue\n"], "--stack"),  # "$" matched before a final newline
    (["--republish-interval", "2"], "--republish-interval"),  # not an option
])
def test_a_bad_command_line_exits_2_naming_the_option(argv: list[str], knob: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        config_from_args(argv)
    assert exc.value.code == 2 and knob in capsys.readouterr().err


def test_a_state_directory_it_cannot_use_exits_2_naming_it(tmp_path, capsys) -> None:
    """A state dir that is a file, or a head.db that is not a database: the head crashed with a
    traceback (exit 1), which `tokenrelay up` restarted six times before it gave up."""
    from head.__main__ import main

    file = tmp_path / "file"
    file.write_text("x")
    argv = ["--insecure", "--control", "tcp://127.0.0.1:1", "--publish", "tcp://127.0.0.1:2"]
    assert main(argv + ["--state-dir", str(file)]) == 2
    assert "cannot use the state directory %s" % file in capsys.readouterr().err
    state = tmp_path / "state"
    state.mkdir()
    (state / "head.db").write_bytes(b"not a database, just garbage" * 100)
    assert main(argv + ["--state-dir", str(state)]) == 2
    assert "file is not a database" in capsys.readouterr().err


def test_missing_keys_name_a_command_that_works(tmp_path, capsys) -> None:
    """The head said `tokenrelay keys init DIR`, which the CLI refuses (unrecognized arguments)."""
    import re
    import shlex

    from head.__main__ import main
    from runtime import cli

    keys = tmp_path / "keys"
    argv = ["--control", "tcp://127.0.0.1:1", "--publish", "tcp://127.0.0.1:2", "--state-dir", str(tmp_path),
            "--curve-dir", str(keys)]
    assert main(argv) == 2
    command = re.search(r"run `tokenrelay ([^`]*)`", capsys.readouterr().err).group(1)
    assert cli.main(shlex.split(command)) == 0
    assert (keys / "head.key_secret").exists()
