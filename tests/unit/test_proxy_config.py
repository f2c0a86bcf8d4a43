"""Unit tests for proxy.config: CLI parsing, env fallback, validation (exit code 2)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from proxy.config import ENV_PREFIX, ProxyConfig, default_workers


def test_defaults() -> None:
    c = ProxyConfig.from_args(["--head", "tcp://10.0.0.1:5555"])
    assert c.head == "tcp://10.0.0.1:5555" and c.bind == "127.0.0.1:8000"
    assert c.workers == default_workers() >= 1
    assert (c.worker_connections, c.backlog, c.stale_after, c.log_level) == (16384, 4096, 3.0, "INFO")


def test_all_options_and_round_trip() -> None:
    argv = ["--head", "tcp://h:1", "--bind", "0.0.0.0:9000", "--workers", "3", "--worker-connections", "50",
            "--stale-after", "1.5", "--first-token-timeout", "7", "--idle-timeout", "8",
            "--graceful-timeout", "2", "--log-level", "debug", "--curve-dir", "/etc/tokenrelay/keys"]
    c = ProxyConfig.from_args(argv)
    assert (c.bind, c.workers, c.worker_connections, c.stale_after, c.log_level) == (
        "0.0.0.0:9000", 3, 50, 1.5, "DEBUG")
    assert (c.first_token_timeout, c.idle_timeout, c.graceful_timeout) == (7.0, 8.0, 2.0)
    assert c.curve_dir == "/etc/tokenrelay/keys"


def test_env_fallback_and_cli_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "HEAD", "tcp://envhead:1")
    monkeypatch.setenv(ENV_PREFIX + "WORKERS", "5")
    assert ProxyConfig.from_args([]).workers == 5
    assert ProxyConfig.from_args(["--workers", "2"]).workers == 2
    assert ProxyConfig.from_args([]).head == "tcp://envhead:1"


@pytest.mark.parametrize("argv", [
    [],
    ["--head", "localhost:5555"],
    ["--head", "tcp://h:1", "--bind", "8000"],
    ["--head", "tcp://h:1", "--bind", "h:99999"],
    ["--head", "tcp://h:1", "--bind", "::1:8000"],  # gunicorn exited 1 on it (a crash, restarted 5 times)
    ["--head", "tcp://h:1", "--workers", "0"],
    ["--head", "tcp://h:1", "--workers", "two"],
    ["--head", "tcp://h:1", "--stale-after", "0"],
    ["--head", "tcp://h:1", "--log-level", "LOUD"],
    ["--head", "tcp://h:1", "--no-such-flag"],
])
def test_bad_args_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        ProxyConfig.from_args(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_direct_construction_validates_with_knob_name() -> None:
    with pytest.raises(ValueError, match="--worker-connections"):
        ProxyConfig(head="tcp://h:1", worker_connections=0)


def test_limits_and_access_flags(tmp_path) -> None:
    argv = ["--head", "tcp://h:1", "--total-timeout", "30", "--keepalive-interval", "0.5", "--max-attempts", "2",
            "--retry-window", "4", "--breaker-failures", "3", "--breaker-cooldown", "2.5",
            "--load-stale-after", "1.5", "--max-body-bytes", "1000", "--max-pending-chars", "5000",
            "--max-chunk-chars", "700", "--api-keys-file", str(tmp_path / "keys"), "--protect-health",
            "--rate-limit", "60"]
    c = ProxyConfig.from_args(argv)
    assert (c.total_timeout, c.keepalive_interval, c.max_attempts, c.retry_window) == (30.0, 0.5, 2, 4.0)
    assert (c.breaker_failures, c.breaker_cooldown, c.load_stale_after) == (3, 2.5, 1.5)
    assert (c.max_body_bytes, c.max_pending_chars, c.max_chunk_chars) == (1000, 5000, 700)
    assert c.api_keys_file == str(tmp_path / "keys") and c.protect_health and c.rate_limit == 60
    defaults = ProxyConfig.from_args(["--head", "tcp://h:1"])
    assert not defaults.protect_health and defaults.rate_limit == 0 and defaults.api_keys_file is None


@pytest.mark.parametrize("argv, knob", [
    (["--max-attempts", "0"], "--max-attempts"),
    (["--total-timeout", "0"], "--total-timeout"),
    (["--keepalive-interval", "-1"], "--keepalive-interval"),
    (["--rate-limit", "-5"], "--rate-limit"),
    (["--max-pending-chars", "0"], "--max-pending-chars"),
    (["--body-min-rate", "-1"], "--body-min-rate"),
    (["--header-timeout", "0"], "--header-timeout"),
])
def test_bad_limits_name_the_flag(argv: list[str], knob: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ProxyConfig.from_args(["--head", "tcp://h:1"] + argv)
    assert knob in capsys.readouterr().err


def test_a_proxy_advertises_its_bind_address_or_its_host_name_for_wildcards() -> None:
    import socket

    from proxy.gateway import advertised_endpoint
    assert advertised_endpoint("127.0.0.1:8000") == "127.0.0.1:8000"
    assert advertised_endpoint("10.1.2.3:80") == "10.1.2.3:80"
    assert advertised_endpoint("0.0.0.0:8000") == "%s:8000" % socket.getfqdn()
    assert advertised_endpoint("[::]:8000") == "%s:8000" % socket.getfqdn()


def test_direct_writes_are_on_by_default_and_turned_off_by_flag_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ProxyConfig(head="tcp://h:1").direct_writes is True
    assert ProxyConfig.from_args(["--head", "tcp://h:1", "--no-direct-writes"]).direct_writes is False
    monkeypatch.setenv(ENV_PREFIX + "DIRECT_WRITES", "0")
    assert ProxyConfig.from_args(["--head", "tcp://h:1"]).direct_writes is False
    assert ProxyConfig.from_args(["--head", "tcp://h:1", "--direct-writes"]).direct_writes is True


@pytest.mark.parametrize("text, on", [("1", True), ("true", True), ("YES", True), ("on", True),
                                      ("0", False), ("false", False), ("No", False), ("off", False)])
def test_boolean_env_vars_are_read_as_booleans(text: str, on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "PROTECT_HEALTH", text)
    assert ProxyConfig.from_args(["--head", "tcp://h:1"]).protect_health is on


def test_a_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV_PREFIX + "PROTECT_HEALTH", "maybe")
    with pytest.raises(SystemExit) as info:
        ProxyConfig.from_args(["--head", "tcp://h:1"])
    assert info.value.code == 2 and ENV_PREFIX + "PROTECT_HEALTH" in capsys.readouterr().err
    monkeypatch.setenv(ENV_PREFIX + "PROTECT_HEALTH", "1")
    monkeypatch.setenv(ENV_PREFIX + "WORKERS", "lots")
    with pytest.raises(SystemExit):
        ProxyConfig.from_args(["--head", "tcp://h:1"])
    assert ENV_PREFIX + "WORKERS" in capsys.readouterr().err


def test_help_lists_each_setting_with_its_default_and_variable(capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help at the terminal's width
    with pytest.raises(SystemExit):
        ProxyConfig.from_args(["--help"])
    out = capsys.readouterr().out
    assert "--max-body-bytes" in out and "default 16777216; env TOKENRELAY_PROXY_MAX_BODY_BYTES" in out
    assert "--no-protect-health" in out and "--head" in out


def test_open_files_limit_is_raised_to_fit_the_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    from proxy import server

    limits = {"now": (1024, 65536)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        limits["now"] = value

    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert server.raise_open_files_limit(16384) == 16384 + server.FD_MARGIN
    assert limits["now"] == (16384 + server.FD_MARGIN, 65536)


def test_open_files_limit_stops_at_the_hard_limit_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import resource

    from proxy import server

    limits = {"now": (1024, 4096)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: limits.update(now=value))
    assert server.raise_open_files_limit(16384) == 4096
    assert limits["now"] == (4096, 4096)
    assert "below" in caplog.text and "--worker-connections 16384" in caplog.text


def test_open_files_limit_that_cannot_be_raised_is_a_warning_not_a_crash(monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    import resource

    from proxy import server

    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, resource.RLIM_INFINITY))

    def refuse(which: int, value: tuple[int, int]) -> None:
        raise ValueError("current limit exceeds maximum limit")

    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert server.raise_open_files_limit(16384) == 256
    assert "cannot raise the open-files limit" in caplog.text


@pytest.mark.parametrize("bind,loopback", [
    ("127.0.0.1:8000", True), ("127.9.0.1:8000", True), ("localhost:8000", True), ("[::1]:8000", True),
    ("0.0.0.0:8000", False), ("[::]:8000", False), ("10.1.2.3:8000", False), ("proxy.example:8000", False),
])
def test_which_binds_only_this_host_can_reach(bind: str, loopback: bool) -> None:
    assert ProxyConfig.from_args(["--head", "tcp://h:1", "--bind", bind]).loopback_only is loopback


def test_a_proxy_others_can_reach_refuses_to_start_without_api_keys(capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import __main__ as proxy_main
    from proxy import server

    started = []
    monkeypatch.setattr(server, "run", lambda config: started.append(config) or 0)
    monkeypatch.setattr("proxy.config.prepare_metrics_dir", lambda: None)
    monkeypatch.setattr("runtime.logs.setup_logging", lambda *a, **k: None)
    base = ["--head", "tcp://h:1", "--insecure", "--bind", "0.0.0.0:8000"]
    assert proxy_main.main(base) == 2
    err = capsys.readouterr().err
    assert "0.0.0.0:8000" in err and "API key" in err and "--open-api" in err
    assert not started
    # on purpose, or with keys, or on loopback: it starts
    assert proxy_main.main(base + ["--open-api"]) == 0
    monkeypatch.setenv("TOKENRELAY_API_KEYS", "k1")
    assert proxy_main.main(base) == 0
    monkeypatch.delenv("TOKENRELAY_API_KEYS")
    assert proxy_main.main(["--head", "tcp://h:1", "--insecure"]) == 0
    assert len(started) == 3


def _pem_pair(tmp_path, name: str) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = tmp_path / (name + ".crt"), tmp_path / (name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_a_certificate_and_key_that_do_not_load_exit_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is not PEM, or the key of another certificate: every gunicorn worker died at boot
    and was replaced at once, forever (four tracebacks a second), while `tokenrelay up` saw a live proxy."""
    cert, key = _pem_pair(tmp_path, "a")
    _, other_key = _pem_pair(tmp_path, "b")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    base = ["--head", "tcp://h:1", "--bind", "127.0.0.1:8443"]
    assert ProxyConfig.from_args(base + ["--certfile", cert, "--keyfile", key]).scheme == "https"
    for pair in ((str(junk), key), (cert, str(junk)), (cert, other_key)):
        with pytest.raises(SystemExit) as info:
            ProxyConfig.from_args(base + ["--certfile", pair[0], "--keyfile", pair[1]])
        assert info.value.code == 2
        assert "cannot load them as a certificate and its key" in capsys.readouterr().err
