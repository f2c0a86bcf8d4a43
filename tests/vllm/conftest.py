"""Fixtures for the real-vLLM tier: a hermetic environment and the tiny model (helpers: harness.py).

vLLM keeps its caches, IPC sockets and temp files under the session's temp dir, and the engine core runs
without a separate worker process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so each start takes ~10 s.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: needs the real vLLM engine; skipped when vllm is missing")


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point vLLM's caches, IPC and temp files at a session temp dir; one-process-per-engine layout."""
    root = tmp_path_factory.mktemp("vllm")
    for sub in ("cache", "tmp", "rpc", "models"):
        (root / sub).mkdir()
    env = {
        "VLLM_CACHE_ROOT": str(root / "cache"),
        "TMPDIR": str(root / "tmp"),
        "VLLM_RPC_BASE_PATH": str(root / "rpc"),
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core without a separate worker: ~10 s start
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TOKENRELAY_CACHE_DIR": str(root / "models"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer: re-read TMPDIR
        yield root


@pytest.fixture(scope="session")
def tiny_model(vllm_env: Path) -> Path:
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(vllm_env / "tiny-llama")
