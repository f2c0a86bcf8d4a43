"""MOCK engine: deterministic fake text with configurable timing. For tests and benchmarks only.

Runs inside model_proc's asyncio loop; owns no socket. It does not run a model: it emits words from a
fixed list on a timer, so the serving path (proxy, sockets, control plane) can be tested and measured
without a GPU. Every request runs on loop timers (no task per request), and tokens due in the same loop
iteration leave in one batch, like one step of a real engine.

engine_args (all optional):
  ttft_ms         time to first token (default 20)
  itl_ms          interval between tokens (default 10)
  tokens          output length when the request does not set max_tokens (default 64)
  max_running     requests generated at once; more wait in FIFO order (default 0: unlimited)
  max_context     prompt words + max_tokens allowed (default 4096), else a 400
  fatal_trigger   a string that, when found in a prompt, makes the engine die (tests the dead sentinel)
  startup_ms      how long the engine takes to start (default 0), to stand in for a real cold start
  abort_raises    true: abort() raises (tests that a crash in the replica's receive path kills it loudly)
Each is checked for its type and range (numbers >= 0, counts integers, abort_raises a boolean): a bad
value stops the replica at start (EngineLoadError), it never hangs or crashes requests later.
Prompt "tokens" are whitespace-separated words; each output token is one word plus a space, and its
token id is the word's index in WORDS. The text is a function of (prompt, position) only: the word after
token id t is WORDS[t + 1], the first one is picked by the prompt's CRC. So a request resumed from the
token ids another replica sent (GenerateRequest.resume) continues exactly as an uninterrupted run would.

Timing is an absolute schedule on the loop's clock: the k-th token this replica makes for a request is
due at begin + ttft + k * itl (begin: when the request started running here), so a late loop iteration
does not push every later token back (no drift), as with a fixed-rate engine.

What a mock deployment serves (docs/api.md, "Engines"): the proxy maps OpenAI requests for it itself
(proxy/openai_request.py), so this engine sees only prompt/messages and SamplingParams. Honoured:
`max_tokens`/`max_completion_tokens` (output length), `stop` (as vLLM: the text ends before the first
stop string, within or across tokens; text that may begin one is held back), `stream`,
`stream_options.include_usage`. Accepted with no effect on the fixed text: `temperature`, `top_p`,
`top_k`, `seed`, `presence_penalty`, `frequency_penalty`, `user`; `n` must be 1. Any other field (tools,
response_format, logprobs, ...) and the routes /v1/responses, /tokenize, /detokenize are refused by the
proxy with a 400 naming them. Relayed requests (GenerateRequest.endpoint) are refused here with a 400.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import zlib
from typing import Any, Optional

from model_proc.engine import DeltaSink, EngineRequestError, EngineStats
from runtime.protocol import GenerateRequest

log = logging.getLogger(__name__)

WORDS = (
    "the quick brown fox jumps over a lazy dog while tokens stream through "
    "relay replicas to many patient clients under steady load"
).split()

_KNOWN_ARGS = {"ttft_ms", "itl_ms", "tokens", "max_running", "max_context", "fatal_trigger", "startup_ms",
               "abort_raises"}


def _number(args: dict[str, Any], key: str, default: float) -> float:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError("%s must be a number >= 0, got %r" % (key, value))
    return float(value)


def _count(args: dict[str, Any], key: str, default: int, minimum: int) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError("%s must be an integer >= %d, got %r" % (key, minimum, value))
    return value


class _Request:
    __slots__ = ("request_id", "prompt_tokens", "max_tokens", "start", "emitted", "handle", "stop", "resumed",
                 "begun_at", "text", "sent")

    def __init__(self, request_id: str, prompt_tokens: int, max_tokens: int, start: int,
                 stop: list[str], resumed: int = 0) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.start = start  # index in WORDS of completion token 0
        self.emitted = resumed  # completion tokens so far (those made on a lost replica included)
        self.resumed = resumed
        self.handle: Optional[asyncio.TimerHandle] = None
        self.stop = [s for s in stop if s]  # the proxy refuses "" (as vLLM does)
        self.begun_at = 0.0  # loop time it started running here
        self.text = ""  # with stop strings: the text made here so far, and how much of it went out
        self.sent = 0


class MockEngine:
    name = "mock"
    supports_resume = True
    model_card = b""  # the proxy writes a mock deployment's /v1/models entry itself

    def __init__(self, model: str, engine_args: dict[str, Any]) -> None:
        unknown = set(engine_args) - _KNOWN_ARGS
        if unknown:
            raise ValueError("unknown mock engine_args %s (known: %s)"
                             % (sorted(unknown), ", ".join(sorted(_KNOWN_ARGS))))
        self.model = model
        # each value checked for its type: max_running -1 queued every request forever, abort_raises
        # "false" was true (every client disconnect crashed the replica), fatal_trigger 5 failed every request
        args = engine_args
        self.ttft = _number(args, "ttft_ms", 20) / 1000.0
        self.itl = _number(args, "itl_ms", 10) / 1000.0
        self.default_tokens = _count(args, "tokens", 64, 1)
        self.max_running: Optional[int] = _count(args, "max_running", 0, 0) or None  # 0: unlimited
        self.max_context = _count(args, "max_context", 4096, 1)
        trigger = args.get("fatal_trigger")
        if trigger is not None and (not isinstance(trigger, str) or not trigger):
            raise ValueError("fatal_trigger must be a non-empty string, got %r" % (trigger,))
        self.fatal_trigger: Optional[str] = trigger
        abort_raises = args.get("abort_raises", False)
        if not isinstance(abort_raises, bool):
            raise ValueError("abort_raises must be true or false, got %r" % (abort_raises,))
        self.abort_raises = abort_raises
        self.startup = _number(args, "startup_ms", 0) / 1000.0  # a cold start, like a real engine's
        self._sink: Optional[DeltaSink] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._running: dict[str, _Request] = {}
        self._waiting: collections.OrderedDict[str, _Request] = collections.OrderedDict()

    async def start(self, sink: DeltaSink) -> None:
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        if self.startup:
            await asyncio.sleep(self.startup)
        log.info("[startup] MOCK engine (not a model): ttft=%.0fms itl=%.0fms tokens=%d",
                 self.ttft * 1000, self.itl * 1000, self.default_tokens)

    def add_request(self, req: GenerateRequest) -> None:
        assert self._loop is not None, "start() first"
        if req.endpoint:  # only engines that serve the OpenAI API themselves take relayed bodies
            raise EngineRequestError("the mock engine does not serve %s" % req.endpoint, param="endpoint")
        if req.messages is not None:
            text = " ".join(m.content for m in req.messages)
            param = "messages"
        else:
            text = req.prompt or ""
            param = "prompt"
        if self.fatal_trigger and self.fatal_trigger in text:
            self._loop.call_soon(self._sink.fatal, "mock fatal_trigger found in prompt")  # type: ignore
            return
        prompt_tokens = len(text.split())
        max_tokens = req.params.max_tokens if req.params.max_tokens is not None else self.default_tokens
        if prompt_tokens + max_tokens > self.max_context:
            raise EngineRequestError(
                "This model's maximum context length is %d tokens; the request has %d prompt tokens "
                "and asks for %d completion tokens." % (self.max_context, prompt_tokens, max_tokens),
                param=param)
        start = zlib.crc32(text.encode()) % len(WORDS)
        resumed = 0
        if req.resume is not None and req.resume.token_ids:
            ids = req.resume.token_ids
            if any(not 0 <= t < len(WORDS) for t in ids):
                raise EngineRequestError("resume token ids must be in [0, %d)" % len(WORDS), param="resume")
            resumed = len(ids)
            start = (ids[-1] + 1 - resumed) % len(WORDS)  # continue after the last token sent
        r = _Request(req.request_id, prompt_tokens, max_tokens, start, list(req.params.stop), resumed)
        if self.max_running is not None and len(self._running) >= self.max_running:
            self._waiting[r.request_id] = r
        else:
            self._begin(r)

    def _begin(self, r: _Request) -> None:
        self._running[r.request_id] = r
        loop = self._loop
        assert loop is not None
        r.begun_at = loop.time()
        r.handle = loop.call_at(r.begun_at + self.ttft, self._tick, r)

    def _tick(self, r: _Request) -> None:
        if r.emitted >= r.max_tokens:  # resumed after its last token: only the end was lost
            self._sink.emit(r.request_id, "", "length", r.prompt_tokens, r.emitted)  # type: ignore
            self._finished(r.request_id)
            return
        index = (r.start + r.emitted) % len(WORDS)
        word = WORDS[index]
        r.emitted += 1
        finish: Optional[str] = None
        if r.stop:
            text, finish = self._through_stop(r, word + " ")
            if text or finish:  # no token ids: text held back for a stop string cannot be resumed
                self._sink.emit(r.request_id, text, finish, r.prompt_tokens, r.emitted)  # type: ignore
        else:
            text = word + " "
            if r.emitted >= r.max_tokens:
                finish = "length"
            self._sink.emit(r.request_id, text, finish, r.prompt_tokens, r.emitted, (index,))  # type: ignore
        if finish is None:
            due = r.begun_at + self.ttft + (r.emitted - r.resumed) * self.itl  # absolute: no drift
            r.handle = self._loop.call_at(due, self._tick, r)  # type: ignore[union-attr]
        else:
            self._finished(r.request_id)

    @staticmethod
    def _through_stop(r: _Request, piece: str) -> tuple[str, Optional[str]]:
        """What of the text so far plus `piece` may go out now, and the finish reason, as vLLM treats stop
        strings: the text ends before the first one, wherever it falls (inside a word, across tokens),
        and the last len(longest) - 1 characters are held back until they cannot begin one."""
        r.text += piece
        found = [i for i in (r.text.find(stop, r.sent) for stop in r.stop) if i >= 0]
        if found:
            end, finish = min(found), "stop"
        elif r.emitted >= r.max_tokens:
            end, finish = len(r.text), "length"
        else:
            end, finish = max(r.sent, len(r.text) - max(map(len, r.stop)) + 1), None
        text, r.sent = r.text[r.sent:end], end
        return text, finish

    def _finished(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        while self._waiting and (self.max_running is None or len(self._running) < self.max_running):
            _, nxt = self._waiting.popitem(last=False)
            self._begin(nxt)

    def abort(self, request_id: str) -> None:
        if self.abort_raises:
            raise RuntimeError("mock abort_raises is set")
        r = self._running.get(request_id)
        if r is not None:
            if r.handle is not None:
                r.handle.cancel()
            self._finished(request_id)
            return
        self._waiting.pop(request_id, None)

    def stats(self) -> EngineStats:
        usage = len(self._running) / self.max_running if self.max_running else 0.0
        return EngineStats(running=len(self._running), waiting=len(self._waiting), kv_cache_usage=usage)

    async def shutdown(self) -> None:
        for r in self._running.values():
            if r.handle is not None:
                r.handle.cancel()
        self._running.clear()
        self._waiting.clear()
