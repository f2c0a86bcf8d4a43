"""Test tiers, one per folder: each test is marked with its folder's tier, so `pytest -m unit` runs the fast
tier alone (seconds) and `pytest -m "not vllm"` everything but the real engine.

  tests/unit/         unit         no sockets, no processes, fake clocks
  tests/component/    component    real sockets inside one process
  tests/integration/  integration  real processes (`sys.executable -m ...`)
  tests/vllm/         vllm         the real vLLM engine on a tiny CPU model
  tests/gpu/          gpu          a CUDA host

A test in another tier's folder that starts processes carries `pytest.mark.integration` itself.
"""
from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "component", "integration", "vllm", "gpu")
_ROOT = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            tier = Path(str(item.fspath)).resolve().relative_to(_ROOT).parts[0]
        except ValueError:
            continue
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
