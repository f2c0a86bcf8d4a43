"""`python -m agent`'s command line, derived from AgentConfig's fields (runtime.settings)."""
from __future__ import annotations

import socket

import pytest

from agent.config import AgentConfig, config_from_args
from agent.lifecycle import RestartPolicy

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_insecure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENRELAY_INSECURE", raising=False)


def test_no_arguments_give_the_dataclass_defaults_and_the_host_name() -> None:
    cfg = config_from_args([])
    assert cfg == AgentConfig() and cfg.agent_id == socket.gethostname() and cfg.labels == {}
    assert cfg.policy == RestartPolicy()
    assert config_from_args(["--agent-id", ""]).agent_id == socket.gethostname()


def test_every_flag_the_launcher_and_operators_pass_reaches_its_field() -> None:
    cfg = config_from_args([
        "--head", "tcp://10.0.0.1:7100", "--host", "10.0.0.2", "--agent-id", "gpu-7",
        "--replica-endpoint", "tcp://127.0.0.1:7200", "--heartbeat-interval", "0.25", "--stop-grace", "13",
        "--liveness-timeout", "4", "--stuck-timeout", "30", "--label", "zone=a", "--label", "gpu=h100",
        "--parent-pid", "42", "--curve-dir", "/k", "--cpu-kvcache-gib", "2", "--metrics-port", "-1",
        "--metrics-host", "0.0.0.0", "--adopt", "--on-stop", "stop", "--log-level", "DEBUG", "--insecure",
        "--replica-log-dir", "/logs"])
    assert cfg == AgentConfig(
        head="tcp://10.0.0.1:7100", host="10.0.0.2", agent_id="gpu-7", replica_endpoint="tcp://127.0.0.1:7200",
        heartbeat_interval=0.25, stop_grace=13.0, liveness_timeout=4.0, stuck_timeout=30.0,
        labels={"zone": "a", "gpu": "h100"}, parent_pid=42, curve_dir="/k", cpu_kvcache_gib=2, metrics_port=-1,
        metrics_host="0.0.0.0", adopt=True, on_stop="stop", log_level="DEBUG", insecure=True,
        replica_log_dir="/logs")
    assert cfg.policy == RestartPolicy(liveness_timeout=4.0, stuck_timeout=30.0)


def test_an_orderly_stop_leaves_the_replicas_only_for_an_agent_that_adopts() -> None:
    fixed = ["--replica-endpoint", "tcp://127.0.0.1:7200"]
    assert not config_from_args([]).leaves_replicas
    assert config_from_args(["--adopt"] + fixed).leaves_replicas  # the next agent adopts them
    # tokenrelay up: replicas outlive an agent crash, but the stack's stop stops them
    assert not config_from_args(["--adopt", "--on-stop", "stop"] + fixed).leaves_replicas


@pytest.mark.parametrize("text, insecure", [("1", True), ("0", False)])
def test_tokenrelay_insecure_in_the_environment_counts_like_the_flag(
        text: str, insecure: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_INSECURE", text)
    assert config_from_args([]).insecure is insecure


@pytest.mark.parametrize("argv, says", [
    (["--label", "zone"], "--label must look like key=value, got 'zone'"),
    (["--label", "=a"], "--label must look like key=value"),
    (["--head", "10.0.0.1:7100"], "--head must be a tcp:// or ipc:// endpoint"),
    (["--heartbeat-interval", "0"], "--heartbeat-interval must be between"),
    (["--stop-grace", "-1"], "--stop-grace must be >= 0"),
    (["--adopt"], "--adopt needs a fixed --replica-endpoint"),
    (["--on-stop", "leave"], "--on-stop leave needs --adopt"),
    (["--on-stop", "later"], "invalid choice"),
    (["--stuck-timeout", "soon"], "--stuck-timeout"),
    (["--head-timeout", "5"], "unrecognized arguments"),  # not an option
    # both started the agent: 99999 crashed it with an OverflowError traceback, and every replica assigned
    # to "tcp://x" failed to bind "tcp://tcp://x:*"
    (["--metrics-port", "99999"], "--metrics-port: must be at most 65535"),
    (["--host", "tcp://10.0.0.1"], "--host: must be a host name or IP address"),
    (["--host", "10.0.0.1:7200"], "--host: must be a host name or IP address"),
])
def test_a_bad_command_line_exits_2_saying_what_to_change(argv: list[str], says: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        config_from_args(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err
