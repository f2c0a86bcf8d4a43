"""vLLM's own OpenAI serving layer inside the replica: the app `vllm serve` builds, driven without HTTP.

Runs inside model_proc's asyncio loop, next to `AsyncLLM` (vllm_engine.py); owns no socket. Must never
re-implement a piece of the OpenAI protocol: requests and responses are built by vLLM's serving classes
(OpenAIServingChat, OpenAIServingCompletion, OpenAIServingResponses, ServingTokenization), reached through
vLLM's own FastAPI app (the routes, request validation, error handlers and middleware of `vllm serve`),
which this module calls as an ASGI application, one call per relayed request, the way an HTTP server
would, minus the HTTP: the proxy already parsed that.

- `serve_namespace` turns a deployment's engine_args into the `argparse.Namespace` that `vllm serve`
  would parse from the same options (vLLM's own parser), so engine and serving options (tool_call_parser,
  reasoning_parser, chat_template, enable_auto_tool_choice, generation_config, ...) mean what they mean
  there.
- `ServingApp.submit` runs one request as an asyncio task. Response bytes go to the `DeltaSink` as they
  come: each body chunk (an SSE event when streaming) is one delta's text; the last one carries
  finish_reason "stop". A status >= 400 becomes `sink.error` with the body untouched. Abort cancels the
  task, which is what a client disconnect does to `vllm serve` (vLLM then aborts the generation).
- Token counts: `count_tokens` wraps the engine's `generate`; a context variable ties each engine
  request to the relayed request that started it, so deltas carry prompt and completion token counts
  and the request keeps its output token ids (state a mid-stream resume needs).
- Resume (model_proc.relay_resume): a streamed chat or text completion with n=1 reports, with each
  chunk, the token ids behind it; a resumed one (`submit(..., resume=...)`) runs with those ids appended
  to its engine prompt, and its chunks are rewritten to continue the client's stream.
"""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import msgspec

from model_proc.engine import DeltaSink, EngineLoadError, EngineRequestError
from model_proc.relay_resume import continue_events, continued, refusal, reportable
from runtime.protocol import Resume

log = logging.getLogger(__name__)

# Endpoints relayed to vLLM's app (the proxy's OpenAI routes; docs/api.md).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize")


# --------------------------------------------------------------------------- options


def serve_argv(engine_args: dict[str, Any], option_actions: dict[str, argparse.Action]) -> list[str]:
    """`vllm serve` command-line options for engine_args (keys are the options' dest names, as in vLLM's
    Python API: tool_call_parser, enable_auto_tool_choice, max_model_len, ...). Raises ValueError naming
    a key that is not a `vllm serve` option."""
    argv: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        action = option_actions.get(flag)
        if action is None:
            raise ValueError("engine_args.%s is not a `vllm serve` option" % key)
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            elif "--no-" + flag[2:] in option_actions:
                argv.append("--no-" + flag[2:])
            continue  # a store_true option that is off is its default
        if isinstance(value, (dict,)):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [flag] + [json.dumps(v) if isinstance(v, dict) else str(v) for v in value]
        else:
            argv += [flag, str(value)]
    return argv


def serve_namespace(model: str, engine_args: dict[str, Any]) -> argparse.Namespace:
    """The Namespace `vllm serve MODEL <engine_args as options>` parses, checked as it checks it."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="tokenrelay-replica", exit_on_error=False))
    argv: list[str] = []
    try:
        argv = ["--model", model] + serve_argv(engine_args, parser._option_string_actions)
        ns = parser.parse_args(argv)
        validate_parsed_serve_args(ns)
    except (argparse.ArgumentError, TypeError, ValueError, SystemExit) as exc:
        raise EngineLoadError("bad engine_args for vllm (as `vllm serve` options %s): %s" % (argv, exc)) from exc
    return ns


# --------------------------------------------------------------------------- per-request state


@dataclass
class Relayed:
    """One relayed request: what the replica knows of it while vLLM's app serves it."""

    request_id: str
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # per engine request (n, list prompts)
    completion_tokens: dict[str, int] = field(default_factory=dict)
    token_ids: dict[str, list[int]] = field(default_factory=dict)  # output 0's ids per engine request
    report_ids: bool = False  # report each chunk's token ids (a stream that may be resumed elsewhere)
    resume: Optional[Resume] = None  # continue after these ids (sent by a replica that was lost)
    reported: int = 0  # ids already reported
    clean: int = 0  # ids whose text vLLM's detokenizer has let out (it holds back an unfinished character)

    @property
    def resumed(self) -> int:
        return len(self.resume.token_ids) if self.resume is not None else 0

    @property
    def prompt_total(self) -> int:  # the resumed ids are in the engine's prompt, but not the client's
        return sum(self.prompt_tokens.values()) - self.resumed

    @property
    def completion_total(self) -> int:  # ... and they were generated for the client
        return sum(self.completion_tokens.values()) + self.resumed

    def unreported_ids(self) -> list[int]:
        """Ids whose text went out, not reported yet (one engine request, else none: not resumable)."""
        if not self.report_ids or len(self.token_ids) != 1:
            return []
        (ids,) = self.token_ids.values()
        new = ids[self.reported:self.clean]
        self.reported = max(self.reported, self.clean)
        return new

    def completion_reported(self, final: bool) -> int:
        """completion_tokens for a Delta: while ids are reported, the count of those (so the proxy sees
        every token sent has its id; the held-back ones follow with their text), else the engine's."""
        if final or not self.report_ids:
            return self.completion_total
        return self.resumed + self.reported

    def note_text(self, out: Any) -> None:
        """After record_output (delta mode): mark the ids whose text is out. A replacement character
        means the detokenizer gave up on invalid bytes: resuming after them would not match, so stop."""
        text = out.outputs[0].text if out.outputs else ""
        if "\ufffd" in text:
            self.report_ids = False
        elif text and len(self.token_ids) == 1:
            self.clean = len(next(iter(self.token_ids.values())))


_current: contextvars.ContextVar[Optional[Relayed]] = contextvars.ContextVar("tokenrelay_relayed", default=None)


def record_output(rec: Relayed, engine_request_id: str, out: Any, delta: bool) -> None:
    """Count one engine output (a vLLM RequestOutput) against the relayed request."""
    if out.prompt_token_ids is not None:
        rec.prompt_tokens[engine_request_id] = len(out.prompt_token_ids)
    new = sum(len(o.token_ids) for o in out.outputs)
    first = out.outputs[0].token_ids if out.outputs else []
    ids = rec.token_ids.setdefault(engine_request_id, [])
    if delta:
        rec.completion_tokens[engine_request_id] = rec.completion_tokens.get(engine_request_id, 0) + new
        ids.extend(first)
    else:  # cumulative or final-only outputs
        rec.completion_tokens[engine_request_id] = new
        ids[:] = first


def count_tokens(engine: Any) -> None:
    """Wrap `engine.generate` (an AsyncLLM instance) so outputs are counted against the relayed request
    running in the caller's context."""
    from vllm.sampling_params import RequestOutputKind

    original = engine.generate

    async def generate(prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                       **kwargs: Any) -> AsyncIterator[Any]:
        rec = _current.get()
        if rec is not None and rec.report_ids and not reportable(sampling_params):
            rec.report_ids = False
        if rec is not None and rec.resume is not None:  # continue after the ids a lost replica sent
            prompt, sampling_params = continued(prompt, sampling_params, rec.resume.token_ids)
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        async for out in original(prompt, sampling_params, request_id, *args, **kwargs):
            if rec is not None:
                record_output(rec, request_id, out, delta)
                if rec.report_ids and delta:
                    rec.note_text(out)
            yield out

    engine.generate = generate


# --------------------------------------------------------------------------- the app


def error_fields(body: bytes) -> tuple[str, str, Optional[str]]:
    """(message, type, param) of a vLLM error body {"error": {...}} (or of anything else)."""
    try:
        err = json.loads(body)["error"]
        return str(err.get("message", "")), str(err.get("type", "")), err.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        return body.decode("utf-8", "replace")[:500], "server_error", None


class ServingApp:
    """vLLM's OpenAI FastAPI app with its state, serving relayed requests into a DeltaSink."""

    def __init__(self, app: Any, sink: DeltaSink, reasoning_parser: bool = False) -> None:
        self._app = app
        self._sink = sink
        self._tasks: dict[str, asyncio.Task] = {}
        self._reasoning_parser = reasoning_parser  # the deployment splits reasoning from content

    @classmethod
    async def build(cls, engine: Any, args: argparse.Namespace, sink: DeltaSink) -> "ServingApp":
        """The app and state `vllm serve` builds on this engine (vLLM's build_app and init_app_state)."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        supported = await engine.get_supported_tasks()
        app = build_app(args, supported, engine.model_config)
        await init_app_state(engine, app.state, args, supported)
        serving = cls(app, sink, bool(getattr(args, "reasoning_parser", None)))
        count_tokens(engine)
        return serving

    def __len__(self) -> int:
        return len(self._tasks)

    async def model_card(self, name: str) -> bytes:
        """The `GET /v1/models` entry vLLM's app gives for `name` (JSON), b"" if it lists no such model."""
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self._app(_scope("GET", "/v1/models", []), receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        try:
            cards = json.loads(body)["data"]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("vllm_serving [startup] /v1/models answered %r: %s", body[:200], exc)
            return b""
        for card in cards:
            if isinstance(card, dict) and card.get("id") == name:
                return json.dumps(card, separators=(",", ":")).encode()
        return b""

    def submit(self, request_id: str, endpoint: str, body: bytes, resume: Optional[Resume] = None,
               headers: Optional[dict[str, str]] = None) -> None:
        """Serve one relayed request (`headers`: the client's that vLLM's app reads; None: Content-Type
        JSON only); a `resume` that cannot be honoured raises EngineRequestError (501)."""
        rec = Relayed(request_id, resume=resume)
        if resume is not None or b'"stream"' in body:  # only streams are resumed: parse no other body
            try:
                why = refusal(endpoint, json.loads(body), self._reasoning_parser)
            except ValueError:
                why = "the body is not JSON"
            except RecursionError:  # vLLM's app answers it (its 400); it was a 500 from here
                why = "the body is nested too deeply"
            if resume is not None and why is not None:
                raise EngineRequestError("cannot resume this request: %s" % why, param="resume", status=501)
            rec.report_ids = why is None
        ctx = contextvars.copy_context()
        ctx.run(_current.set, rec)
        # a task copies the context it is created in: every engine request it starts sees `rec`
        task = ctx.run(asyncio.get_running_loop().create_task, self._serve(rec, endpoint, body, headers),
                       name="vllm-serve-%s" % request_id)
        self._tasks[request_id] = task

    def abort(self, request_id: str) -> bool:
        task = self._tasks.pop(request_id, None)
        if task is None:
            return False
        task.cancel()  # as a client disconnect: vLLM's handler is cancelled and aborts the generation
        return True

    def cancel_all(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    async def _serve(self, rec: Relayed, endpoint: str, body: bytes, headers: Optional[dict[str, str]]) -> None:
        rid = rec.request_id
        status = 0
        error_body: list[bytes] = []
        gone = asyncio.Event()
        sent_body = False
        ended = False  # the response's last body message went to the sink

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # never set: an abort cancels this task instead
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, ended
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                return
            if kind != "http.response.body":
                return
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            ended = ended or not more
            if status >= 400:
                error_body.append(chunk)
                if not more:
                    raw = b"".join(error_body)
                    message_, _type, param = error_fields(raw)
                    self._sink.error(rid, status, message_, param, raw)
                return
            if chunk or not more:
                text = chunk.decode("utf-8")
                if rec.resume is not None and text:
                    text = continue_events(text, rec.resumed, rec.resume.created)
                # the ids of the outputs vLLM's layer consumed: their text is in this chunk or an earlier
                # one (an output's chunks leave in one loop iteration, so in one TokenBatch)
                ids = rec.unreported_ids()
                if text or ids or not more:
                    self._sink.emit(rid, text, None if more else "stop", rec.prompt_total,
                                    rec.completion_reported(not more), ids)

        scope = _scope("POST", endpoint, _relayed_headers(rid, body, headers))
        try:
            await self._app(scope, receive, send)
        except asyncio.CancelledError:
            raise  # aborted: ends silently
        except Exception as exc:  # vLLM's app answers errors itself; this is a bug on our side
            log.exception("vllm_serving [request] %s failed", rid)
            self._sink.error(rid, 500, "serving failed: %s: %s" % (type(exc).__name__, exc))
        else:
            if status == 0:
                self._sink.error(rid, 500, "vLLM's app sent no response")
            elif not ended:  # else the request held its slot here until the proxy's idle timeout
                self._sink.error(rid, 500, "vLLM's app ended the response before its last part")
        finally:
            self._tasks.pop(rid, None)


def _relayed_headers(rid: str, body: bytes, headers: Optional[dict[str, str]]) -> list[tuple[bytes, bytes]]:
    """The HTTP headers of a relayed request as vLLM's app sees them: the client's that it reads (its 400
    for a Content-Type other than JSON, its data-parallel rank, priority, session and trace headers; None:
    from a proxy that sends none, Content-Type JSON), and an X-Request-Id, which names vLLM's answer
    (`chatcmpl-<id>`) as in `vllm serve`: the client's, else none when the body names a `request_id`
    (vLLM takes that), else the relayed request's id (stable when a stream moves to another replica)."""
    sent = {"content-type": "application/json"} if headers is None else headers
    out = [(b"content-length", str(len(body)).encode())]
    out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in sent.items() if k != "content-length"]
    if "x-request-id" not in sent and not _names_request_id(body):
        out.append((b"x-request-id", rid.encode()))
    return out


class _RequestId(msgspec.Struct):
    request_id: Any = None


_request_id_decoder = msgspec.json.Decoder(_RequestId)


def _names_request_id(body: bytes) -> bool:
    """Whether a body has a string `request_id` (read only when the name is in it)."""
    if b'"request_id"' not in body:
        return False
    try:
        return isinstance(_request_id_decoder.decode(body).request_id, str)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return False  # vLLM's app refuses it, or a BOM / NaN body: its id is then the relayed request's


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of one request to vLLM's app, as an HTTP server on loopback would make it."""
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "headers": headers,
    }
