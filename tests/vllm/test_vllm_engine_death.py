"""A dead vLLM engine core is reported once through `sink.fatal`, in flight or idle.

Each test kills the engine-core process of its own engine with SIGKILL (one start each, ~10-15 s).
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.vllm.harness import EngineHarness, skip_without_vllm, start_engine, stop_engine

skip_without_vllm()

from model_proc.engine import EngineRequestError  # noqa: E402
from runtime.protocol import GenerateRequest, SamplingParams  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(180)]


def engine_core_pid() -> int:
    """The engine-core child of this test process (titled VLLM::EngineCore when setproctitle is there)."""
    candidates = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "EngineCore" in cmdline:
            return child.pid
        if "resource_tracker" not in cmdline:
            candidates.append(child.pid)
    assert len(candidates) == 1, "cannot tell which child is the engine core: %s" % candidates
    return candidates[0]


async def wait_for_fatal(eng: EngineHarness, poll_stats: bool, timeout: float = 15.0) -> float:
    started = time.monotonic()
    while not eng.sink.fatals:
        if poll_stats:
            eng.engine.stats()  # model_proc's status loop calls this every 250 ms
        assert time.monotonic() - started < timeout, "no fatal %.0f s after the engine died" % timeout
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def assert_refuses_new_requests(eng: EngineHarness) -> None:
    with pytest.raises(EngineRequestError) as err:
        eng.add(GenerateRequest("after-death", prompt="hello", params=SamplingParams(max_tokens=4)))
    assert err.value.status == 503


def test_engine_killed_mid_stream_is_fatal(tiny_model: Path) -> None:
    eng = start_engine(str(tiny_model), {"max_model_len": 2048})
    try:
        async def scenario() -> float:
            eng.engine.add_request(GenerateRequest("doomed", prompt="x", params=SamplingParams(
                max_tokens=2000, temperature=0.0)))
            while not eng.sink.deltas.get("doomed"):
                await asyncio.sleep(0.005)
            os.kill(engine_core_pid(), signal.SIGKILL)
            return await wait_for_fatal(eng, poll_stats=False)

        took = eng.run(scenario())
        assert len(eng.sink.fatals) == 1, eng.sink.fatals
        assert "doomed" not in eng.sink.errors  # the replica reports the death once, for everyone
        assert eng.sink.deltas["doomed"][-1].finish is None
        assert_refuses_new_requests(eng)
        print("\nfatal reported %.2f s after SIGKILL: %s" % (took, eng.sink.fatals[0]))
    finally:
        stop_engine(eng)


def test_engine_killed_while_idle_is_found_by_stats(tiny_model: Path) -> None:
    eng = start_engine(str(tiny_model), {"max_model_len": 2048})
    try:
        os.kill(engine_core_pid(), signal.SIGKILL)
        took = eng.run(wait_for_fatal(eng, poll_stats=True))
        eng.run(asyncio.sleep(0.5))
        eng.engine.stats()
        assert len(eng.sink.fatals) == 1, eng.sink.fatals
        assert_refuses_new_requests(eng)
        print("\nidle death found %.2f s after SIGKILL" % took)
    finally:
        stop_engine(eng)
