"""What the proxy reads of an OpenAI request body, and the proxy-side mapping for engines that do not
serve the OpenAI API themselves.

Pure logic; runs in proxy workers; owns no socket and does no I/O. Raises InvalidRequest (HTTP 400) with
`param` naming the offending field; `null` means "absent".

Two paths (docs/api.md):
- relayed (engines in RELAY_ENGINES, i.e. vLLM): the proxy reads only `RoutingFields` (model, stream, and
  the prompt text when a deployment routes by prefix) and sends the body untouched; the replica's engine
  serves it with its own OpenAI serving layer, so every field means what it means to that engine.
- mapped (the mock engine): `parse_chat` / `parse_completion` decode the body into MockChatRequest /
  MockCompletionRequest and map it into a GenerateRequest. Those structs are the one schema of the
  mock's bodies: msgspec validates with them (any other field is a 400 naming it: nothing is silently
  ignored) and proxy/openapi.py derives the document's request schemas from them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping, Optional, TypeVar, Union

import msgspec

from proxy.errors import InvalidRequest
from runtime.protocol import ChatMessage, GenerateRequest, SamplingParams

CHAT = "chat"
COMPLETION = "completion"
# engines whose replicas serve the OpenAI API themselves (the proxy relays the body to them)
RELAY_ENGINES = frozenset({"vllm"})
# endpoint (proxy route) -> kind; only CHAT and COMPLETION exist on the mapped path
ENDPOINT_KINDS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION, "/v1/responses": "responses",
                  "/tokenize": "tokenize", "/detokenize": "detokenize"}
INT32_MAX = 2**31 - 1  # counts (max_tokens, top_k): more is never meant and must stay encodable
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seed


@dataclass(frozen=True)
class ParsedRequest:
    kind: str  # CHAT or COMPLETION
    model: str
    stream: bool
    include_usage: bool
    params: SamplingParams
    prompt: Optional[str] = None
    messages: Optional[tuple[ChatMessage, ...]] = None

    def routing_text(self) -> str:
        """The prompt as routing sees it: the completion prompt, or the chat turns in order (the
        replica's chat template is not known here, but a shared conversation start renders the same)."""
        if self.kind == CHAT:
            return "".join("%s: %s\n" % (m.role, m.content) for m in self.messages or ())
        return self.prompt or ""

    def to_generate(self, request_id: str) -> GenerateRequest:
        if self.kind == CHAT:
            return GenerateRequest(request_id=request_id, messages=list(self.messages or ()), params=self.params)
        return GenerateRequest(request_id=request_id, prompt=self.prompt, params=self.params)


class RoutingFields(msgspec.Struct):
    """The fields the proxy reads of a relayed request (the schema of /openapi.json's RelayedRequest)."""

    model: Optional[str] = None  # absent: the only deployment, as `vllm serve` takes its only model
    stream: Optional[bool] = None


class _AnyRouting(msgspec.Struct):
    """What `routing_fields` decodes: both fields as any JSON value, judged afterwards."""

    model: Any = None
    stream: Any = None


class PromptFields(msgspec.Struct):
    """Decoded only for prefix routing: the text a shared prompt start is recognised by."""

    messages: Any = None
    prompt: Any = None
    input: Any = None  # the Responses API


class Routing(msgspec.Struct, frozen=True):
    """What the proxy read of a body to route it. `model` is None when the body names none the proxy can
    use (absent, null, "", not a string, or the body unreadable); `problem` then says why, when it is
    the body's fault: the proxy's own 400, given when no vLLM deployment takes the body (see
    proxy/app.py: the only deployment, a vLLM one, answers as `vllm serve` does)."""

    model: Optional[str] = None
    stream: bool = False
    problem: Any = None  # an InvalidRequest (a struct, not a dataclass: built per request, 0.1 us vs 0.5)


# the request headers vLLM's app reads, sent with a relayed body (GenerateRequest.headers): it refuses a
# Content-Type other than JSON (and none), and takes a data-parallel rank, a priority, a session and
# trace context from them; X-Request-ID is the proxy's own (the client's when it is usable)
RELAYED_HEADERS = ("content-type", "x-data-parallel-rank", "x-vllm-priority", "x-session-id", "traceparent",
                   "tracestate")
_WSGI_KEYS = tuple((name, "CONTENT_TYPE" if name == "content-type" else "HTTP_" + name.upper().replace("-", "_"))
                   for name in RELAYED_HEADERS)
_routing_decoder = msgspec.json.Decoder(_AnyRouting)
_prompt_decoder = msgspec.json.Decoder(PromptFields)
# `stream` as vLLM's request models read it (pydantic's lax bool): these strings in any case, 0 and 1
_TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE_WORDS = frozenset({"0", "off", "f", "false", "n", "no"})


def routing_fields(body: bytes) -> Routing:
    """model and stream of a JSON body, read as `vllm serve` reads them: JSON as Python's json module takes
    it (FastAPI's parser: a UTF-8 BOM, NaN and Infinity are JSON there), `stream` as pydantic's bool
    ("true", "yes", 1, ... are true), "" as no model. Never raises: what it cannot read is `problem`."""
    if not body:
        return Routing(problem=InvalidRequest("request body is empty; expected a JSON object"))
    try:
        fields = _routing_decoder.decode(body)  # the common case: one pass, no objects built for the rest
        model, stream = fields.model, fields.stream
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        try:
            obj = json.loads(body)
        except RecursionError:
            return Routing(problem=InvalidRequest("request body is nested too deeply"))
        except ValueError:
            return Routing(problem=InvalidRequest("request body is not valid JSON: %s" % exc))
        if not isinstance(obj, dict):
            return Routing(problem=InvalidRequest("request body must be a JSON object, not %s"
                                                  % type(obj).__name__))
        model, stream = obj.get("model"), obj.get("stream")
    streams = _lax_bool(stream)
    problem = None
    if streams is None:
        problem = InvalidRequest("'stream' must be a boolean", param="stream")
    if model is not None and not isinstance(model, str):
        problem = InvalidRequest("'model' must be a string", param="model")
    elif model == "":
        problem = InvalidRequest("'model' must be a non-empty string", param="model")
    return Routing(model if isinstance(model, str) and model else None, bool(streams), problem)


def relayed_headers(environ: Mapping[str, Any]) -> dict[str, str]:
    """The client's RELAYED_HEADERS (from its WSGI environ), by lowercase name. An empty one is left out:
    vLLM's app reads an empty header as none."""
    return {name: value for name, key in _WSGI_KEYS if (value := environ.get(key))}


def _lax_bool(value: Any) -> Optional[bool]:
    """`value` as pydantic's lax bool reads it (null: false), None when it refuses it."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.lower()
        return True if word in _TRUE_WORDS else False if word in _FALSE_WORDS else None
    return None


def prompt_text(body: bytes, limit: int) -> str:
    """The first `limit` characters of the prompt as prefix routing sees it: each message as
    "role: content" in order (text parts as they are, an image or other part by its URL or JSON), or the
    prompt (or input) as text. The replica's chat template is not known here, but a shared conversation
    start renders the same. Built only as far as `limit`: a body with a 10 MB base64 image costs its
    decode, not a rendering of the image. Never raises: a body the engine will refuse still gets a route."""
    try:
        p = _prompt_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""
    if not isinstance(p.messages, list):
        value = p.prompt if p.prompt is not None else p.input
        if isinstance(value, str):
            return value[:limit]
        return "" if value is None else msgspec.json.encode(value)[:limit].decode("utf-8", "ignore")
    out: list[str] = []
    left = limit
    for m in p.messages:
        if left <= 0:
            break
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):
            text = "".join(_part_text(part, left) for part in content)
        else:
            text = content if isinstance(content, str) else "" if content is None else str(content)
        line = ("%s: %s\n" % (m.get("role"), text[:left]))[:left]
        out.append(line)
        left -= len(line)
    return "".join(out)


def _part_text(part: Any, limit: int) -> str:
    """A content part as routing text, at most `limit` characters."""
    if not isinstance(part, dict):
        return str(part)[:limit]
    if isinstance(part.get("text"), str):
        return part["text"][:limit]
    for key in ("image_url", "input_audio", "video_url", "file"):
        inner = part.get(key)
        url = inner.get("url") if isinstance(inner, dict) else inner
        if isinstance(url, str):
            return url[:limit]
    return "[%s]" % part.get("type")


# --------------------------------------------------------------------------- the mock engine's bodies
# One schema: these structs validate the body (parse_chat / parse_completion) and are the request
# schemas of the OpenAPI document (proxy/openapi.py derives them). `forbid_unknown_fields`: a field the
# mock cannot honour is a 400 naming it, never silently ignored.

Count = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options of a streamed answer: include_usage adds a usage chunk before [DONE]."""

    include_usage: Optional[bool] = None


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    """One part of a message's content; the mock engine takes text parts only."""

    type: Literal["text"]
    text: str


class Message(msgspec.Struct, forbid_unknown_fields=True):
    """One chat turn; null content (an assistant turn that only had tool calls) is empty text."""

    role: Annotated[str, msgspec.Meta(min_length=1, examples=["user"])]
    content: Union[str, list[TextPart], None] = None


class _MockRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The fields both mock bodies share."""

    model: Annotated[str, msgspec.Meta(min_length=1, description="a deployment name (GET /v1/models)",
                                       examples=["mock"])]
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[Annotated[Count, msgspec.Meta(description="most tokens to generate")]] = None
    n: Optional[Annotated[int, msgspec.Meta(ge=1, le=1, description="the mock engine takes only 1")]] = None
    temperature: Optional[Annotated[float, msgspec.Meta(ge=0.0)]] = None
    top_p: Optional[Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]] = None
    top_k: Optional[Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)]] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    user: Optional[str] = None


class MockChatRequest(_MockRequest, kw_only=True):
    """POST /v1/chat/completions on a mock deployment."""

    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    max_completion_tokens: Optional[Annotated[Count, msgspec.Meta(description="wins over max_tokens")]] = None


class MockCompletionRequest(_MockRequest, kw_only=True):
    """POST /v1/completions on a mock deployment."""

    prompt: Annotated[str, msgspec.Meta(description="one prompt")]


MOCK_REQUESTS = (MockChatRequest, MockCompletionRequest)
_chat_decoder = msgspec.json.Decoder(MockChatRequest)
_completion_decoder = msgspec.json.Decoder(MockCompletionRequest)
_Body = TypeVar("_Body", MockChatRequest, MockCompletionRequest)


def parse_chat(body: bytes, engine: str = "mock") -> ParsedRequest:
    """Map a chat body; 400 naming the field (and `engine`, for a field it does not take)."""
    req = _decode(body, _chat_decoder, engine)
    _check_like_vllm(req)
    messages = tuple(ChatMessage(m.role, _text(m.content)) for m in req.messages)
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return ParsedRequest(CHAT, req.model, bool(req.stream), _include_usage(req), _sampling(req, limit),
                         messages=messages)


def parse_completion(body: bytes, engine: str = "mock") -> ParsedRequest:
    """Map a completion body; 400 naming the field (and `engine`, for a field it does not take)."""
    req = _decode(body, _completion_decoder, engine)
    _check_like_vllm(req)
    return ParsedRequest(COMPLETION, req.model, bool(req.stream), _include_usage(req),
                         _sampling(req, req.max_tokens), prompt=req.prompt)


def _decode(body: bytes, decoder: msgspec.json.Decoder[_Body], engine: str) -> _Body:
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)  # the common case: one pass over the bytes
    except msgspec.ValidationError as exc:
        first = exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest("request body is not valid JSON: %s" % exc) from None
    try:
        obj = msgspec.json.decode(body)
    except msgspec.ValidationError:  # a number out of range: the typed pass said where
        raise _invalid(first, engine) from None
    try:  # read it again as JSON Schema does: null members absent, 16.0 an integer
        return msgspec.convert(_as_schema_reads(obj, 5), decoder.type)
    except msgspec.ValidationError as exc:
        raise _invalid(exc, engine) from None


def _check_like_vllm(req: _MockRequest) -> None:
    """The rules `vllm serve` applies across fields, with its messages: a mock deployment must not
    accept (and silently ignore) what a vLLM one refuses."""
    if req.stream_options is not None and req.stream_options != StreamOptions() and not req.stream:
        raise InvalidRequest("Stream options can only be defined when `stream=True`.", param="stream_options")
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or ()
    if any(not stop for stop in stops):
        raise InvalidRequest("stop cannot contain an empty string.", param="stop")


def _as_schema_reads(value: Any, depth: int) -> Any:
    """`value` with null object members dropped and integral floats made ints, down to `depth` (5: a
    content part's members; the depth of the deepest struct, so a deeply nested body costs nothing)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if depth and isinstance(value, dict):
        return {k: _as_schema_reads(v, depth - 1) for k, v in value.items() if v is not None}
    if depth and isinstance(value, list):
        return [_as_schema_reads(v, depth - 1) for v in value]
    return value


_FIELD_ERROR = re.compile(r"Object (contains unknown|missing required) field `(.*)`")
_JSON_TYPES = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}


def _invalid(exc: msgspec.ValidationError, engine: str) -> InvalidRequest:
    """msgspec's error as a 400 whose `param` is the JSON path (`messages[0].role`), in JSON's words."""
    what, _, where = str(exc).partition(" - at `$")
    path = where.rstrip("`").lstrip(".")  # "$.messages[0].role" -> "messages[0].role"
    field = _FIELD_ERROR.fullmatch(what)
    if field is not None:
        param = "%s.%s" % (path, field.group(2)) if path else field.group(2)
        if field.group(1) == "missing required":
            return InvalidRequest("'%s' is required" % param, param=param)
        return InvalidRequest("'%s' is not supported by this deployment's engine (%s); see docs/api.md"
                              % (param, engine), param=param)
    what = re.sub(r"`[^`]*`", lambda m: re.sub(r"\w+", lambda w: _JSON_TYPES.get(w[0], w[0]), m[0]), what)
    what = what[:1].lower() + what[1:]  # "Expected `integer` >= 1" -> "'max_tokens': expected ..."
    if not path:
        return InvalidRequest("request body must be a JSON object; %s" % what)
    return InvalidRequest("'%s': %s" % (path, what), param=path)


def _text(content: Union[str, list[TextPart], None]) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content)


def _include_usage(req: _MockRequest) -> bool:
    return req.stream_options is not None and bool(req.stream_options.include_usage)


def _sampling(req: _MockRequest, max_tokens: Optional[int]) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          stop=stop, seed=req.seed, presence_penalty=req.presence_penalty,
                          frequency_penalty=req.frequency_penalty)


def plain_max_tokens(query: Mapping[str, Union[str, list[str]]]) -> Optional[str]:
    """The legacy endpoint's one query parameter, `max_tokens`; any other (a typo such as `max_token`
    was ignored, and the answer ran to the engine's default length) or a repeated one is a 400."""
    for name, value in query.items():
        if name != "max_tokens":
            raise InvalidRequest("unknown query parameter %r; this endpoint takes only ?max_tokens=N"
                                 % name[:100], param=name[:100])
        if isinstance(value, list):
            raise InvalidRequest("max_tokens given more than once", param="max_tokens")
    limit = query.get("max_tokens")
    return limit if isinstance(limit, str) else None


def parse_plain(body: bytes, max_tokens: Optional[str]) -> tuple[str, SamplingParams]:
    """The legacy endpoint: raw UTF-8 text body, optional ?max_tokens=N."""
    try:
        prompt = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("request body must be UTF-8 text", param="body") from None
    if not prompt:
        raise InvalidRequest("request body (the prompt) is empty", param="body")
    limit: Optional[int] = None
    if max_tokens is not None:
        try:
            limit = int(max_tokens)
        except ValueError:
            raise InvalidRequest("max_tokens must be an integer", param="max_tokens") from None
        if not 1 <= limit <= INT32_MAX:
            raise InvalidRequest("max_tokens must be between 1 and %d" % INT32_MAX, param="max_tokens")
    return prompt, SamplingParams(max_tokens=limit)
