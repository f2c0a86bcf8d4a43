"""`tokenrelay up`: which head state a stack uses, and --port/--bind."""
from __future__ import annotations

from pathlib import Path

import pytest

from runtime import cli, stack_commands
from runtime.stack_config import StackConfig


def test_each_config_file_gets_its_own_stack_and_the_default_is_default(tmp_path):
    a, b = tmp_path / "a" / "mock.yaml", tmp_path / "b" / "mock.yaml"
    assert stack_commands.stack_name(None) == "default"
    assert stack_commands.stack_name(str(a)) != stack_commands.stack_name(str(b))  # same file name, different files
    assert stack_commands.stack_name(str(a)).startswith("mock-")
    assert stack_commands.stack_name(str(a)) == stack_commands.stack_name(str(a))  # stable across runs
    assert stack_commands.stack_name(str(a), "prod") == "prod"


def test_up_port_and_bind_override_the_proxy_address_and_pass_the_stack(monkeypatch):
    made = {}

    class FakeLauncher:
        def __init__(self, stack, path, log_level, stack_name=None, reset_deployments=False, verbose=False,
                     open_api=False):
            made.update(bind=stack.proxy_bind, name=stack_name, reset=reset_deployments, open_api=open_api)

        def run(self):
            return 0

    import runtime.launcher
    monkeypatch.setattr(runtime.launcher, "Launcher", FakeLauncher)
    ns = cli.build_parser().parse_args(["up", "--port", "8123", "--bind", "0.0.0.0", "--reset-deployments"])
    stack_commands._up_launcher(ns)(StackConfig(), Path("x.yaml"), "INFO").run()
    assert made == {"bind": "0.0.0.0:8123", "name": "default", "reset": True, "open_api": False}
    ns = cli.build_parser().parse_args(["up", "--port", "9000"])
    stack_commands._up_launcher(ns)(StackConfig(proxy_bind="127.0.0.2:8000"), Path("x.yaml"), "INFO")
    assert made["bind"] == "127.0.0.2:9000" and made["reset"] is False
    ns = cli.build_parser().parse_args(["up", "--bind", "::1"])  # gunicorn exited on "::1:8000" (no port)
    stack_commands._up_launcher(ns)(StackConfig(), Path("x.yaml"), "INFO")
    assert made["bind"] == "[::1]:8000"
    ns = cli.build_parser().parse_args(["up", "--bind", "0.0.0.0", "--open-api"])
    stack_commands._up_launcher(ns)(StackConfig(), Path("x.yaml"), "INFO")
    assert made["open_api"] is True


def test_bad_stack_name_and_port_are_usage_errors():
    assert cli.main(["up", "--stack", "../etc"]) == 2
    assert cli.main(["up", "--port", "70000"]) == 2


def test_up_refuses_ports_in_use_before_starting_anything(monkeypatch, caplog):
    """A second `up` with the same config used to start its agent, which registered with the FIRST
    stack's head under the same agent name: that stack's replicas left routing (requests failed) while
    the second `up` printed "serving on ..." and then stopped because its head could not bind."""
    import runtime.launcher
    from runtime.launcher import Launcher

    stack = StackConfig(head_control="tcp://127.0.0.1:7100", head_publish="ipc:///tmp/x.sock",
                        proxy_bind="127.0.0.1:8000")
    launcher = Launcher(stack, Path("x.yaml"))
    taken = {("127.0.0.1", 7100), ("127.0.0.1", 8000)}
    assert launcher.bind_problems(lambda host, port: "in use" if (host, port) in taken else None) == [
        "head.control tcp://127.0.0.1:7100: in use", "proxy.bind 127.0.0.1:8000: in use"]
    assert launcher.bind_problems(lambda host, port: None) == []
    assert Launcher(StackConfig(head_control="tcp://*:7100"), Path("x.yaml")).bind_problems(
        lambda host, port: "in use" if host == "0.0.0.0" else None) == ["head.control tcp://*:7100: in use"]

    monkeypatch.setattr(runtime.launcher, "bind_problem", lambda host, port: "in use" if port == 7100 else None)
    monkeypatch.setattr(Launcher, "_spawn", lambda *a: pytest.fail("started a process"))
    monkeypatch.setattr(Launcher, "_secure", lambda *a: pytest.fail("touched the keys"))
    assert launcher.run() == 1
    assert "cannot listen on head.control tcp://127.0.0.1:7100: in use." in caplog.text
    assert "Is another tokenrelay stack running" in caplog.text


def test_up_refuses_a_proxy_address_this_host_does_not_have(monkeypatch, caplog):
    """`up --bind 192.0.2.1 --open-api`: the proxy exited 1 after gunicorn's 5 s of retries, a crash the
    launcher restarted 5 times (half a minute) before it stopped the stack."""
    import runtime.launcher
    from runtime.launcher import Launcher

    monkeypatch.setattr(runtime.launcher, "bind_problem",
                        lambda host, port: "not an address of this host" if host == "192.0.2.1" else None)
    monkeypatch.setattr(Launcher, "_spawn", lambda *a: pytest.fail("started a process"))
    assert Launcher(StackConfig(proxy_bind="192.0.2.1:8000"), Path("x.yaml")).run() == 1
    assert "cannot listen on proxy.bind 192.0.2.1:8000: not an address of this host." in caplog.text
    assert "another tokenrelay stack" not in caplog.text
    # agent.host, where replicas bind: each replica crashed (exit 1) and was restarted six times
    assert Launcher(StackConfig(agent_host="192.0.2.1"), Path("x.yaml")).run() == 1
    assert "cannot listen on agent.host 192.0.2.1: not an address of this host." in caplog.text
    # a fixed metrics port in use: the agent crashed (exit 1, a traceback) and was restarted in a loop
    monkeypatch.setattr(runtime.launcher, "bind_problem", lambda host, port: "in use" if port == 9100 else None)
    assert Launcher(StackConfig(agent_metrics_port=9100, head_metrics_port=9101), Path("x.yaml")).run() == 1
    assert "cannot listen on agent.metrics_port 9100: in use." in caplog.text
    assert Launcher(StackConfig(head_metrics_port=9100), Path("x.yaml")).bind_problems() == [
        "head.metrics_port 9100: in use"]


@pytest.mark.parametrize("head", ["garbage", "127.0.0.1:7100", "tcp://127.0.0.1:99999"])
def test_admin_commands_refuse_a_head_that_is_no_endpoint(head, capsys):
    """`tokenrelay status --head garbage` printed ZeroMQ's traceback (exit 1)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["status", "--head", head])
    assert exit_.value.code == 2
    assert "argument --head: must be a ZeroMQ endpoint like tcp://HOST:PORT" in capsys.readouterr().err


def test_up_refuses_a_certificate_that_does_not_load_before_starting_anything(tmp_path, monkeypatch, capsys):
    import runtime.launcher
    monkeypatch.setattr(runtime.launcher, "Launcher", lambda *a, **k: pytest.fail("started the stack"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    config = tmp_path / "stack.yaml"
    config.write_text("deployments: []\n")
    assert cli.main(["up", "--config", str(config), "--certfile", str(junk), "--keyfile", str(junk)]) == 2
    assert "cannot load them as a certificate and its key" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "1e9", "soon"])
def test_admin_commands_refuse_a_timeout_that_is_not_a_wait(timeout, capsys):
    """--timeout -1 waited for the head forever; nan, inf and 1e9 raised tracebacks."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["status", "--timeout", timeout])
    assert exit_.value.code == 2
    assert "argument --timeout: must be" in capsys.readouterr().err


def test_status_json_says_why_when_the_head_does_not_answer(monkeypatch, capsys):
    """deploy/scale/delete --json printed {"ok": false, "error"}; status --json printed nothing."""
    def unreachable(*a, **k):
        raise cli.HeadUnreachable("no answer from the head at tcp://127.0.0.1:1 within 0.1s")
    monkeypatch.setattr(cli.head_client, "status", unreachable)
    monkeypatch.setattr(cli, "_token", lambda ns: "t")
    assert cli.main(["status", "--json", "--head", "tcp://127.0.0.1:1"]) == 1
    import json
    assert json.loads(capsys.readouterr().out) == {
        "ok": False, "error": "no answer from the head at tcp://127.0.0.1:1 within 0.1s"}


def test_models_prepare_of_a_prepared_model_says_where_it_is(tmp_path, monkeypatch, capsys):
    """A second `tokenrelay models prepare smollm2` printed nothing: the user was not told where the
    folder (what `vllm serve` or a deployment's `model` may name) is."""
    import runtime.models

    monkeypatch.setattr(runtime.models, "prepare_model", lambda name, progress: tmp_path / name)
    assert cli.main(["models", "prepare", "smollm2"]) == 0
    assert "smollm2 is ready in %s" % (tmp_path / "smollm2") in capsys.readouterr().err


def test_models_prepare_of_an_unknown_name_says_so(capsys):
    """`tokenrelay models prepare smolm2` (a typo) printed nothing and exited 0."""
    assert cli.main(["models", "prepare", "smolm2"]) == 1
    assert "no packaged model named 'smolm2' (known: smollm2" in capsys.readouterr().err


def test_a_stack_with_no_replica_to_wait_for_is_announced():
    """With no deployment (or all at 0 replicas) /ready stays 503 and `up` never said "serving on"."""
    from runtime.launcher import announcement
    assert announcement("ready", False) == ""
    assert announcement("protected", False).startswith(" (/ready needs an API key")
    assert announcement("not_ready", False) is None  # replicas wanted: wait for the proxy to route to one
    assert announcement("not_ready", True).startswith(" (no replica yet, none is wanted: `tokenrelay deploy`")
    assert announcement(None, True) is None  # the proxy does not answer yet
