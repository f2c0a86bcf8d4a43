"""runtime.logs: every line carries its process's role; the proxy's role follows the pid after fork."""
from __future__ import annotations

import logging
import os
from typing import Iterator

import pytest

from runtime.logs import proxy_role, setup_logging


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """setup_logging replaces the root logger's handlers: give pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_fixed_role_tags_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("model_proc[r3]", "info")
    logging.getLogger("x").info("[startup] hello %d", 5)
    assert "model_proc[r3] x: [startup] hello 5" in capsys.readouterr().err


def test_the_proxy_role_is_master_here_and_the_worker_pid_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    role = proxy_role()
    assert role() == "proxy[master]"
    monkeypatch.setattr(os, "getpid", lambda: 4242)  # as in a forked gunicorn worker
    assert role() == "proxy[w4242]"


def test_an_unknown_level_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--log-level"):
        setup_logging("head", "LOUD")
