"""Helpers for the real-vLLM tier: a recording sink and an engine bound to its own asyncio loop.

Every engine here runs in one asyncio loop per test module (vLLM's AsyncLLM is bound to the loop that
first uses it), driven with `EngineHarness.run(coro)`.
"""
from __future__ import annotations

import asyncio
import importlib.util
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@dataclass
class Event:
    at: float
    text: str
    finish: Optional[str]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class RecordingSink:
    """Records every call per request; `wait` returns once a request has ended (finish or error)."""

    deltas: dict[str, list[Event]] = field(default_factory=dict)
    errors: dict[str, tuple[int, str, Optional[str]]] = field(default_factory=dict)
    fatals: list[str] = field(default_factory=list)

    def emit(self, request_id: str, text: str, finish_reason: Optional[str],
             prompt_tokens: int, completion_tokens: int, token_ids: Sequence[int] = ()) -> None:
        self.deltas.setdefault(request_id, []).append(
            Event(time.monotonic(), text, finish_reason, prompt_tokens, completion_tokens))

    def error(self, request_id: str, status: int, message: str, param: Optional[str] = None,
              body: bytes = b"") -> None:
        self.errors[request_id] = (status, message, param)

    def fatal(self, reason: str) -> None:
        self.fatals.append(reason)

    def ended(self, request_id: str) -> bool:
        events = self.deltas.get(request_id, [])
        return request_id in self.errors or bool(events and events[-1].finish)

    def text(self, request_id: str) -> str:
        return "".join(e.text for e in self.deltas.get(request_id, []))

    def final(self, request_id: str) -> Event:
        return self.deltas[request_id][-1]

    async def wait(self, *request_ids: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.ended(r) for r in request_ids):
            if self.fatals:
                raise AssertionError("engine died: %s" % self.fatals)
            if time.monotonic() > deadline:
                raise AssertionError("requests %s did not end within %.0f s" % (request_ids, timeout))
            await asyncio.sleep(0.01)


class EngineHarness:
    """One started VllmEngine, its sink and the loop it lives in."""

    def __init__(self, engine: Any, sink: RecordingSink, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.sink = sink
        self.loop = loop

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def add(self, req: Any) -> None:
        """`add_request` from inside the loop, as model_proc's server calls it."""
        async def add() -> None:
            self.engine.add_request(req)

        self.run(add())

    def abort(self, request_id: str) -> None:
        async def abort() -> None:
            self.engine.abort(request_id)

        self.run(abort())

    def generate(self, req: Any, timeout: float = 30.0) -> Event:
        self.add(req)
        self.run(self.sink.wait(req.request_id, timeout=timeout))
        assert req.request_id not in self.sink.errors, self.sink.errors[req.request_id]
        return self.sink.final(req.request_id)


def start_engine(model: str, engine_args: dict[str, Any]) -> EngineHarness:
    from model_proc.vllm_engine import VllmEngine

    loop = asyncio.new_event_loop()
    sink = RecordingSink()
    engine = VllmEngine(model, engine_args)
    try:
        loop.run_until_complete(asyncio.wait_for(engine.start(sink), 240))
    except BaseException:
        loop.run_until_complete(engine.shutdown())
        loop.close()
        raise
    return EngineHarness(engine, sink, loop)


def stop_engine(harness: EngineHarness) -> None:
    try:
        harness.loop.run_until_complete(harness.engine.shutdown())
    finally:
        harness.loop.close()


def skip_without_vllm() -> None:
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed", allow_module_level=True)
