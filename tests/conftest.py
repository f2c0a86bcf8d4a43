"""Test tiers, one per folder: each test is marked with its folder's tier, so `pytest -m unit` runs the fast
tier alone (seconds) and `pytest -m "not vllm"` everything but the real engine.

  tests/unit/         unit         no sockets, no processes, fake clocks
  tests/component/    component    real sockets inside one process
  tests/integration/  integration  real processes (`sys.executable -m ...`)
  tests/vllm/         vllm         the real vLLM engine on a tiny CPU model
  tests/gpu/          gpu          a CUDA host

A test in another tier's folder that starts processes carries `pytest.mark.integration` itself.

The suite is hermetic against the machine it runs on: `pytest_configure` drops the caller's TOKENRELAY_*
settings (all but the model cache) and points TOKENRELAY_STATE_DIR at a fresh directory, so the keys,
admin token and stacks that `tokenrelay up` left in ~/.local/state/tokenrelay (README's first command, run
before its second) are neither used nor touched by any test or the processes tests start.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

TIERS = ("unit", "component", "integration", "vllm", "gpu")
_ROOT = Path(__file__).resolve().parent


KEPT_SETTINGS = ("TOKENRELAY_CACHE_DIR",)  # prepared models: a cache, shared on purpose
_state_dir: str = ""


def pytest_configure(config: pytest.Config) -> None:
    global _state_dir
    for name in [n for n in os.environ if n.startswith("TOKENRELAY_") and n not in KEPT_SETTINGS]:
        del os.environ[name]
    _state_dir = tempfile.mkdtemp(prefix="tokenrelay-test-state-")
    os.environ["TOKENRELAY_STATE_DIR"] = _state_dir


def pytest_unconfigure(config: pytest.Config) -> None:
    if _state_dir:
        shutil.rmtree(_state_dir, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            tier = Path(str(item.fspath)).resolve().relative_to(_ROOT).parts[0]
        except ValueError:
            continue
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
