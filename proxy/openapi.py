"""The OpenAPI 3.1 document of the proxy's HTTP API, served at GET /openapi.json.

Pure data, built once at import; runs in proxy workers; owns no socket. It must say exactly what the
proxy accepts and answers (tests/integration/test_proxy_fuzz.py fuzzes a running proxy against it with
schemathesis). Two surfaces share the OpenAI paths (docs/api.md): a vLLM deployment accepts and answers
exactly what `vllm serve` 0.32.0 does (its own request models validate the relayed body: they are the
schema there, see VLLM_SURFACE), a mock deployment the fields of openai_request.py's MockChatRequest /
MockCompletionRequest, whose schemas are derived from those structs, the ones that validate the body
(null means absent; any other field is a 400 naming it). Every error is the OpenAI error object (`code`
is the status as an integer in vLLM's own errors).
"""
from __future__ import annotations

from typing import Any

import msgspec

from proxy.openai_request import INT32_MAX, MOCK_REQUESTS, RoutingFields

VLLM_SURFACE = ("On a vLLM deployment every field of `vllm serve` 0.32.0 for this path is accepted and "
                "answered by vLLM's own serving layer (tools, response_format, logprobs, n, ...); the "
                "fields listed here are the mock engine's, which refuses any other with a 400 naming it.")

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": "#/components/schemas/%s" % name}


_INT_COUNT = {"type": "integer", "minimum": 1, "maximum": INT32_MAX}


def _mock_schemas() -> dict[str, Schema]:
    """The mock's request schemas, derived from the structs parse_chat/parse_completion decode with.
    An unknown member may be null (null means absent): additionalProperties says exactly that."""
    _, schemas = msgspec.json.schema_components(MOCK_REQUESTS, ref_template="#/components/schemas/{name}")
    for schema in schemas.values():
        if schema.get("additionalProperties") is False:
            schema["additionalProperties"] = {"type": "null"}
    schemas["MockChatRequest"].update(description=VLLM_SURFACE, examples=[
        {"model": "mock", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}])
    schemas["MockCompletionRequest"].update(description=VLLM_SURFACE, examples=[
        {"model": "mock", "prompt": "Once upon a time", "max_tokens": 8}])
    return schemas


USAGE: Schema = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                 "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens",
                                                                  "total_tokens")}}

ERROR: Schema = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "integer", "null"]}},
    }},
}

_FINISH = {"type": ["string", "null"], "examples": ["stop", "length"]}

CHAT_COMPLETION: Schema = {
    "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": USAGE,
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "finish_reason": _FINISH,
            "message": {"type": "object", "properties": {"role": {"const": "assistant"},
                                                         "content": {"type": "string"}}}}}},
    },
}

TEXT_COMPLETION: Schema = {
    "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": USAGE,
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "finish_reason": _FINISH, "text": {"type": "string"}}}},
    },
}

SSE: Schema = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}, "description": (
    "one server-sent event of the stream: `data: {chunk}` per piece of text "
    "(chat.completion.chunk or text_completion), a chunk with finish_reason, "
    "a usage chunk when stream_options.include_usage, then `data: [DONE]`. "
    "`: keep-alive` comments may come first while the request waits for its first token; a failure after "
    "the headers is a `data: {\"error\": {...}}` event followed by `data: [DONE]`.")}

REQUEST_ID = {"description": "the client's X-Request-ID if it sent a printable one (<= 200 chars), "
                             "else the proxy's id of the request", "required": True,
              "schema": {"type": "string"}}
RETRY_AFTER = {"description": "seconds to wait before retrying", "required": True,
               "schema": {"type": "string", "pattern": "^[0-9]+$"}}

ERRORS: dict[str, str] = {
    "400": "malformed JSON, not an object, or a field of the wrong type or value (`param` names it)",
    "401": "API keys are configured and the request has no valid `Authorization: Bearer KEY`",
    "404": "unknown model (code model_not_found) or unknown path (code not_found)",
    "405": "method not allowed on this path",
    "408": "the request body stalled for --body-timeout seconds; the connection closes (code request_timeout)",
    "413": "request body larger than --max-body-bytes (code body_too_large)",
    "415": "unsupported Content-Type (code unsupported_media_type; a vLLM deployment answers 400 as vllm serve)",
    "429": "every replica is busy and the wait queue is full or the wait timed out (code overloaded), or "
           "the API key's rate limit (code rate_limit_exceeded)",
    "503": "no healthy replica, or the replica failed before the first token (code no_healthy_replica)",
    "504": "no first token in time, or the request took longer than its total timeout (code timeout)",
    # made by the HTTP server for requests it cannot parse, on any path (proxy/gunicorn_hooks.py)
    "414": "request line too long (code uri_too_long)",
    "417": "an Expect header other than 100-continue (code expectation_failed)",
    "431": "request headers too many or too large (code request_header_fields_too_large)",
    "500": "internal proxy error",
    "501": "a Transfer-Encoding other than chunked (code not_implemented)",
}
# statuses every operation may answer (the HTTP server's own, a bad request line or header, a bug)
_ANY_PATH_ERRORS = ("400", "414", "417", "431", "500", "501")


def _error(status: str) -> Schema:
    headers: Schema = {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}}
    if status in ("429", "503"):
        headers["Retry-After"] = {"$ref": "#/components/headers/RetryAfter"}
    return {"description": ERRORS[status], "headers": headers,
            "content": {"application/json": {"schema": _ref("Error")}}}


def _ok(description: str, content: dict[str, Schema]) -> Schema:
    return {"description": description, "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
            "content": {media: {"schema": schema} for media, schema in content.items()}}


def _errors(*statuses: str) -> dict[str, Schema]:
    return {s: _error(s) for s in statuses}


_SESSION = {"name": "X-Session-ID", "in": "header", "required": False, "schema": {"type": "string"},
            "description": "requests with the same session id go to the same replica while it is not "
                           "overloaded (deployment routing.session_affinity)"}
_INFERENCE_ERRORS = ("400", "401", "404", "408", "413", "415", "429", "503", "504")


def _inference(summary: str, request: str, response: str) -> Schema:
    return {"post": {
        "summary": summary, "parameters": [_SESSION],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": dict({"200": _ok("the completion (JSON), or with stream: true server-sent events",
                                      {"application/json": _ref(response), "text/event-stream": SSE})},
                          **_errors(*_INFERENCE_ERRORS)),
    }}


# what the proxy itself reads of a relayed body (the rest is the engine's): derived from the struct it decodes
RELAYED_REQUEST: Schema = dict(
    msgspec.json.schema(RoutingFields)["$defs"]["RoutingFields"],
    description="vLLM deployments only: the body of `vllm serve` 0.32.0 for this path, relayed untouched; "
                "the proxy reads `model` (absent: the only deployment) and `stream`, as vllm serve reads them "
                "(docs/api.md). Mock deployments answer 400.")


def _relayed(summary: str) -> Schema:
    return {"post": {
        "summary": summary, "parameters": [_SESSION],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("RelayedRequest")}}},
        "responses": dict({"200": _ok("vLLM's answer (JSON, or server-sent events with stream: true)",
                                      {"application/json": {"type": "object"}, "text/event-stream": SSE})},
                          **_errors(*_INFERENCE_ERRORS)),
    }}


_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}

SPEC: Schema = {
    "openapi": "3.1.0",
    "info": {"title": "tokenrelay proxy", "version": "1.0.0",
             "description": "OpenAI-compatible streaming API in front of tokenrelay replicas (docs/api.md)."},
    "security": [{}, {"bearerAuth": []}],
    "paths": {
        "/v1/chat/completions": _inference("chat completion", "MockChatRequest", "ChatCompletion"),
        "/v1/completions": _inference("text completion", "MockCompletionRequest", "TextCompletion"),
        "/v1/responses": _relayed("OpenAI Responses API (vLLM deployments)"),
        "/tokenize": _relayed("vLLM's /tokenize (vLLM deployments)"),
        "/detokenize": _relayed("vLLM's /detokenize (vLLM deployments)"),
        "/v1/chat/{deployment}": {"post": {
            "summary": "legacy plain interface: the raw prompt in, the text streamed back as plain chunks",
            "parameters": [
                {"name": "deployment", "in": "path", "required": True, "schema": {"type": "string",
                                                                                  "minLength": 1}},
                {"name": "max_tokens", "in": "query", "required": False, "schema": _INT_COUNT}, _SESSION],
            "requestBody": {"required": True, "content": {"text/plain": {"schema": {
                "type": "string", "minLength": 1}}}},
            "responses": dict({"200": _ok("generated text, chunked; a failure mid-stream appends a line "
                                          "`[error] message`", {"text/plain": {"type": "string"}})},
                              **_errors(*_INFERENCE_ERRORS)),
        }},
        "/v1/responses/{response_id}": {"get": {
            "summary": "a stored Responses API answer: tokenrelay stores none, so always 404 (param "
                       "response_id), as `vllm serve` without VLLM_ENABLE_RESPONSES_API_STORE",
            "parameters": [_RESPONSE_ID], "responses": _errors("401", "404", "429")}},
        "/v1/responses/{response_id}/cancel": {"post": {
            "summary": "cancel a stored background response: none is stored, so always 404 (param response_id)",
            "parameters": [_RESPONSE_ID], "responses": _errors("401", "404", "429")}},
        "/v1/models": {"get": {"summary": "deployments, OpenAI list format", "responses": dict({
            "200": _ok("the models", {"application/json": _ref("ModelList")})}, **_errors("401", "429"))}},
        "/health": {"get": {"summary": "200 while the process runs", "security": [{}], "responses": dict({
            "200": _ok("alive", {"application/json": {"type": "object"}})}, **_errors("401"))}},
        "/ready": {"get": {"summary": "200 with a fresh routing table and a healthy replica, else 503",
                           "security": [{}], "responses": {
            "200": _ok("ready", {"application/json": {"type": "object"}}),
            "401": _error("401"),
            "503": _ok("not ready", {"application/json": {"type": "object", "properties": {
                "status": {"const": "not_ready"}, "reason": {"type": "string"}}}})}}},
        "/metrics": {"get": {"summary": "Prometheus metrics of all workers", "security": [{}], "responses": dict({
            "200": _ok("metrics", {"text/plain": {"type": "string"}})}, **_errors("401"))}},
        "/openapi.json": {"get": {"summary": "this document", "security": [{}], "responses": {
            "200": _ok("OpenAPI 3.1", {"application/json": {"type": "object"}})}}},
    },
    "components": {
        "schemas": {
            **_mock_schemas(), "RelayedRequest": RELAYED_REQUEST,
            "ChatCompletion": CHAT_COMPLETION, "TextCompletion": TEXT_COMPLETION, "Error": ERROR,
            "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
                "object": {"const": "list"}, "data": {"type": "array", "items": {
                    "type": "object", "required": ["id", "object", "created", "owned_by"],
                    "description": "a vLLM deployment's entry is vLLM's own (also max_model_len, root, parent, "
                                   "permission), once one of its replicas has started",
                    "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                                   "created": {"type": "integer"}, "owned_by": {"type": "string"}}}}}},
        },
        "headers": {"RequestId": REQUEST_ID, "RetryAfter": RETRY_AFTER},
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                           "description": "required on /v1 when API keys are configured"}},
    },
}


for _methods in SPEC["paths"].values():
    for _operation in _methods.values():
        for _status in _ANY_PATH_ERRORS:
            _operation["responses"].setdefault(_status, _error(_status))
