"""A key given twice (the API keys file, $TOKENRELAY_API_KEYS): `python -m proxy` warns at start naming
where, never the key, and serves it once; one key with two rate limits stops the proxy (exit 2)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.stack import ROOT
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration


def proxy(tmp_path: Path, keys: str) -> list[str]:
    path = tmp_path / "keys.txt"
    path.write_text(keys)
    return [sys.executable, "-m", "proxy", "--head", "tcp://127.0.0.1:1", "--insecure", "--workers", "1",
            "--bind", "127.0.0.1:%d" % free_port(), "--api-keys-file", str(path)]


def env(tmp_path: Path, env_keys: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), TOKENRELAY_API_KEYS=env_keys,
                PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))


def test_a_repeated_key_is_logged_by_line_and_counted_once(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(proxy(tmp_path, "sk-team-secret\nsk-other\nsk-team-secret\n"), cwd=ROOT,
                                env=env(tmp_path, "sk-other"), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "API key(s)" in log.read_text() or proc.poll() is not None, 30, "the proxy's start")
    finally:
        proc.terminate()
        proc.wait(15)
    text = log.read_text()
    assert "API keys: --api-keys-file line 3 repeats line 1; that key counts once" in text, text
    assert "API keys: $TOKENRELAY_API_KEYS item 1 repeats --api-keys-file line 2" in text
    assert "[startup] 2 API key(s)" in text
    assert "sk-team-secret" not in text and "sk-other" not in text


def test_one_key_with_two_rate_limits_stops_the_proxy(tmp_path: Path) -> None:
    out = subprocess.run(proxy(tmp_path, "sk-a 60\nsk-a 600\n"), cwd=ROOT, env=env(tmp_path, ""),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "line 2: the key of line 1 again, with another rate limit (600/min, there 60/min)" in out.stderr
    assert "sk-a" not in out.stderr
