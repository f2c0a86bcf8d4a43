"""What the proxy reads of an OpenAI request body, and the proxy-side mapping for engines that do not
serve the OpenAI API themselves.

Pure logic; runs in proxy workers; owns no socket and does no I/O. Raises InvalidRequest (HTTP 400) with
`param` naming the offending field; `null` means "absent".

Two paths (docs/api.md):
- relayed (engines in RELAY_ENGINES, i.e. vLLM): the proxy reads only `RoutingFields` (model, stream, and
  the prompt text when a deployment routes by prefix) and sends the body untouched; the replica's engine
  serves it with its own OpenAI serving layer, so every field means what it means to that engine.
- mapped (the mock engine): `parse_chat` / `parse_completion` map the body into a GenerateRequest. They
  accept the fields in CHAT_FIELDS / COMPLETION_FIELDS and refuse any other with a 400 naming it:
  nothing is silently ignored.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

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
_COMMON_FIELDS = frozenset({"model", "stream", "stream_options", "max_tokens", "n", "temperature", "top_p",
                            "top_k", "stop", "seed", "presence_penalty", "frequency_penalty", "user"})
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt"}
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


def decode_object(body: bytes) -> dict[str, Any]:
    """The JSON body as a dict; 400 when it is not JSON or not an object."""
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest("request body is not valid JSON: %s" % exc) from None
    if not isinstance(obj, dict):
        raise InvalidRequest("request body must be a JSON object, got %s" % _kind(obj))
    return obj


class RoutingFields(msgspec.Struct):
    """The fields the proxy reads of a relayed request: the one schema it validates itself."""

    model: Optional[str] = None  # absent: the only deployment, as `vllm serve` takes its only model
    stream: Optional[bool] = None


class PromptFields(msgspec.Struct):
    """Decoded only for prefix routing: the text a shared prompt start is recognised by."""

    messages: Any = None
    prompt: Any = None
    input: Any = None  # the Responses API


_routing_decoder = msgspec.json.Decoder(RoutingFields)
_prompt_decoder = msgspec.json.Decoder(PromptFields)


def routing_fields(body: bytes) -> RoutingFields:
    """model and stream of a JSON body; 400 when it is not a JSON object or they have the wrong type."""
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        fields = _routing_decoder.decode(body)
    except msgspec.ValidationError as exc:  # "Expected `str`, got `int` - at `$.model`"
        where = re.search(r"at `\$\.([A-Za-z_]+)", str(exc))
        raise InvalidRequest("invalid request body: %s" % exc, param=where.group(1) if where else None) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest("request body is not valid JSON: %s" % exc) from None
    if fields.model is not None and not fields.model:
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    return fields


def prompt_text(body: bytes) -> str:
    """The prompt as prefix routing sees it: the message contents in order, or the prompt (or input)
    as text. The replica's chat template is not known here, but a shared conversation start renders the
    same. Never raises: a body the engine will refuse still gets a route."""
    try:
        p = _prompt_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""
    if isinstance(p.messages, list):
        return "".join("%s: %s\n" % (m.get("role"), m.get("content")) for m in p.messages if isinstance(m, dict))
    value = p.prompt if p.prompt is not None else p.input
    return value if isinstance(value, str) else msgspec.json.encode(value).decode() if value is not None else ""


def _refuse_unknown(obj: dict[str, Any], known: frozenset[str], engine: str) -> None:
    for name, value in obj.items():
        if name not in known and value is not None:
            raise InvalidRequest("'%s' is not supported by this deployment's engine (%s); see docs/api.md"
                                 % (name, engine), param=name)


def parse_chat(body: Union[bytes, dict[str, Any]], engine: Optional[str] = None) -> ParsedRequest:
    """Map a chat body; with `engine`, refuse any field outside CHAT_FIELDS naming that engine."""
    obj = decode_object(body) if isinstance(body, bytes) else body
    if engine is not None:
        _refuse_unknown(obj, CHAT_FIELDS, engine)
    model = _model(obj)
    messages = _messages(obj.get("messages"))
    stream, include_usage = _stream(obj)
    return ParsedRequest(CHAT, model, stream, include_usage, _sampling(obj), messages=messages)


def parse_completion(body: Union[bytes, dict[str, Any]], engine: Optional[str] = None) -> ParsedRequest:
    """Map a completion body; with `engine`, refuse any field outside COMPLETION_FIELDS."""
    obj = decode_object(body) if isinstance(body, bytes) else body
    if engine is not None:
        _refuse_unknown(obj, COMPLETION_FIELDS, engine)
    model = _model(obj)
    prompt = obj.get("prompt")
    if prompt is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string (batched or token prompts are not supported)",
                             param="prompt")
    stream, include_usage = _stream(obj)
    return ParsedRequest(COMPLETION, model, stream, include_usage, _sampling(obj), prompt=prompt)


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


# --------------------------------------------------------------------------- fields


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _model(obj: dict[str, Any]) -> str:
    model = obj.get("model")
    if model is None:
        raise InvalidRequest("'model' is required", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    return model


def _messages(raw: Any) -> tuple[ChatMessage, ...]:
    if raw is None:
        raise InvalidRequest("'messages' is required", param="messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    out = []
    for i, msg in enumerate(raw):
        where = "messages[%d]" % i
        if not isinstance(msg, dict):
            raise InvalidRequest("%s must be an object, got %s" % (where, _kind(msg)), param=where)
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest("%s.role must be a non-empty string" % where, param=where + ".role")
        out.append(ChatMessage(role=role, content=_content(msg.get("content"), where + ".content")))
    return tuple(out)


def _content(content: Any, where: str) -> str:
    if content is None:  # e.g. an assistant turn that only had tool calls
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("%s must be a string or an array of content parts" % where, param=where)
    texts = []
    for j, part in enumerate(content):
        pw = "%s[%d]" % (where, j)
        if not isinstance(part, dict):
            raise InvalidRequest("%s must be an object" % pw, param=pw)
        if part.get("type") != "text":
            raise InvalidRequest("%s.type %r is not supported; only 'text' parts are"
                                 % (pw, part.get("type")), param=pw + ".type")
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest("%s.text must be a string" % pw, param=pw + ".text")
        texts.append(text)
    return "\n".join(texts)


def _stream(obj: dict[str, Any]) -> tuple[bool, bool]:
    stream = _opt_bool(obj, "stream") or False
    options = obj.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options")
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise InvalidRequest("'stream_options.include_usage' must be a boolean",
                                 param="stream_options.include_usage")
        include_usage = bool(usage)
    return stream, include_usage


def _sampling(obj: dict[str, Any]) -> SamplingParams:
    n = _opt_int(obj, "n", 1)
    if n is not None and n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    max_tokens = _opt_int(obj, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _opt_int(obj, "max_tokens", 1)
    else:
        _opt_int(obj, "max_tokens", 1)  # still validate it
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_opt_float(obj, "temperature", 0.0, None),
        top_p=_opt_float(obj, "top_p", 0.0, 1.0, open_low=True),
        top_k=_opt_int(obj, "top_k", -1),
        stop=_stop(obj.get("stop")),
        seed=_opt_int(obj, "seed", INT64_MIN, INT64_MAX),
        presence_penalty=_opt_float(obj, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_opt_float(obj, "frequency_penalty", -2.0, 2.0),
    )


def _opt_bool(obj: dict[str, Any], name: str) -> Optional[bool]:
    value = obj.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest("'%s' must be a boolean, got %s" % (name, _kind(value)), param=name)
    return value


def _opt_int(obj: dict[str, Any], name: str, minimum: int, maximum: int = INT32_MAX) -> Optional[int]:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("'%s' must be an integer, got %s" % (name, _kind(value)), param=name)
    if value < minimum:
        raise InvalidRequest("'%s' must be >= %d, got %d" % (name, minimum, value), param=name)
    if value > maximum:
        raise InvalidRequest("'%s' must be <= %d, got %d" % (name, maximum, value), param=name)
    return value


def _opt_float(obj: dict[str, Any], name: str, low: Optional[float], high: Optional[float],
               open_low: bool = False) -> Optional[float]:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest("'%s' must be a number, got %s" % (name, _kind(value)), param=name)
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise InvalidRequest("'%s' must be a finite number" % name, param=name)
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        bounds = "%s%s, %s]" % ("(" if open_low else "[", low, high if high is not None else "inf")
        raise InvalidRequest("'%s' must be in %s, got %s" % (name, bounds, value), param=name)
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise InvalidRequest("'stop' must be a string or an array of strings", param="stop")
