"""The interface every model_proc engine implements (mock, vllm), and how engines are looked up.

Runs inside model_proc's asyncio loop. Owns no socket: engines talk to the replica server only through
the `DeltaSink` they are started with. Never import vLLM here (it is imported lazily by vllm_engine).

Contract:
- `start(sink)` loads the model and returns when the engine can take requests; raising `EngineLoadError`
  means the replica cannot ever start with this config (bad model path, bad arguments).
- `add_request(req)` never blocks the loop; it may raise `EngineRequestError` for a request the engine
  refuses at once (a 4xx for the client). Errors found later go to `sink.error`.
- The engine reports text with `sink.emit(...)` (deltas, never cumulative text) and ends each request
  with exactly one emit whose `finish_reason` is set, or one `sink.error`. Aborted requests end silently.
- `abort(request_id)` is idempotent and stops generation for that request.
- `emit(..., token_ids)` passes the completion token ids behind the delta's text (new ones only) when
  the engine knows them; the proxy keeps them to resume the request elsewhere if this replica is lost.
- Resume: an engine with `supports_resume = True` honours `GenerateRequest.resume` (protocol.Resume):
  it continues after the given completion token ids as if it had generated them (prompt + those ids
  as context, `completion_tokens` and `max_tokens` counting them, no text emitted for them). The server
  refuses (501) a resume request to an engine without that attribute, so nothing is silently ignored.
- A fatal failure (the engine cannot go on) is reported with `sink.fatal(reason)`; the server then tells
  every peer the replica is dead and exits.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

from runtime.protocol import GenerateRequest


class EngineLoadError(RuntimeError):
    """The engine cannot start with this configuration; restarting will not help."""


class EngineRequestError(ValueError):
    """The request is invalid for this engine (a client error, HTTP 400 unless `status` says else)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float  # 0.0 - 1.0


class DeltaSink(Protocol):
    def emit(self, request_id: str, text: str, finish_reason: Optional[str],
             prompt_tokens: int, completion_tokens: int, token_ids: Sequence[int] = ()) -> None: ...

    def error(self, request_id: str, status: int, message: str, param: Optional[str] = None,
              body: bytes = b"") -> None: ...

    def fatal(self, reason: str) -> None: ...


class Engine(Protocol):
    name: str
    model_card: bytes  # the engine's own `/v1/models` entry (JSON) once started; b"": none (ReplicaStatus)

    async def start(self, sink: DeltaSink) -> None: ...

    def add_request(self, req: GenerateRequest) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...


# engine name in a deployment config -> "module:factory"; the factory takes (model, engine_args).
ENGINES = {
    "mock": "model_proc.mock_engine:MockEngine",
    "vllm": "model_proc.vllm_engine:VllmEngine",
}


def create_engine(name: str, model: str, engine_args: dict[str, Any]) -> Engine:
    """Build an engine by name. Raises EngineLoadError for an unknown name or bad arguments."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise EngineLoadError("unknown engine %r (choose from %s)" % (name, ", ".join(sorted(ENGINES)))) from None
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    factory = getattr(module, attr)
    try:
        return factory(model, engine_args)
    except (TypeError, ValueError) as exc:
        raise EngineLoadError("bad engine_args for %s: %s" % (name, exc)) from exc
