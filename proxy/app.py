"""The proxy's Falcon WSGI app: OpenAI-compatible routes, request ids, errors in OpenAI's shape.

Runs in each proxy worker, one greenlet per HTTP request. Owns no socket: routing and replica I/O go
through the injected Backend (gateway.Gateway in production, a fake in unit tests). Must never answer
with a hang or a 200 without a body, and must wait for the replica's first event before sending
headers so errors before the first token get a real HTTP status.

Routes:
  POST /v1/chat/completions   POST /v1/completions   POST /v1/chat/{deployment} (legacy plain text)
  GET /v1/models   GET /health   GET /ready   GET /metrics
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Protocol

import falcon
import msgspec

from proxy import metrics
from proxy.bodies import PlainBody, SseBody, as_error, collect, timeout_error
from proxy.chunks import ChatChunks, CompletionChunks, chat_completion_body, text_completion_body
from proxy.config import ProxyConfig
from proxy.errors import (
    BodyTooLarge, ModelNotFound, NoHealthyReplica, ProxyError, UpstreamError, error_body, error_type_for,
)
from proxy.openai_request import CHAT, parse_chat, parse_completion, parse_plain
from proxy.streams import Item, RequestStream
from runtime.protocol import DeploymentRoute, GenerateRequest

log = logging.getLogger(__name__)

_json = msgspec.json.encode
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Backend(Protocol):
    started_at: int

    def next_request_id(self) -> str: ...
    def has_table(self) -> bool: ...
    def has_deployment(self, name: str) -> bool: ...
    def deployments(self) -> list[DeploymentRoute]: ...
    def readiness(self) -> tuple[bool, str]: ...
    def open_stream(self, deployment: str, request: GenerateRequest) -> RequestStream: ...


def create_app(backend: Backend, config: ProxyConfig) -> falcon.App:
    app = falcon.App(middleware=[RequestContext(backend)])
    app.add_route("/v1/chat/completions", OpenAIResource(backend, config, CHAT))
    app.add_route("/v1/completions", OpenAIResource(backend, config, "completion"))
    app.add_route("/v1/chat/{deployment}", PlainResource(backend, config))
    app.add_route("/v1/models", ModelsResource(backend))
    app.add_route("/health", HealthResource())
    app.add_route("/ready", ReadyResource(backend))
    app.add_route("/metrics", MetricsResource())
    app.add_error_handler(Exception, _on_unexpected)
    app.add_error_handler(falcon.HTTPError, _on_http_error)
    app.add_error_handler(ProxyError, _on_proxy_error)
    app.set_error_serializer(_serialize_http_error)
    return app


# --------------------------------------------------------------------------- middleware


class RequestContext:
    """Gives every request an id (X-Request-ID echoed or generated) and counts inference results."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = req.context
        ctx.request_id = self._backend.next_request_id()
        client = req.get_header("X-Request-ID")
        valid = client is not None and 0 < len(client) <= 200 and client.isprintable()
        ctx.client_request_id = client if valid else ctx.request_id
        if valid and client != ctx.request_id:
            log.debug("req=%s client request id %s", ctx.request_id, client)
        ctx.deployment = None  # inference routes set it: the requests_total label
        ctx.tracker = None
        ctx.streaming = False  # the streaming body finishes the tracker itself

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        ctx = req.context
        resp.set_header("X-Request-ID", getattr(ctx, "client_request_id", None) or "-")
        if getattr(ctx, "streaming", False):
            return
        if getattr(ctx, "tracker", None) is not None:
            ctx.tracker.finish(resp.status_code)
        elif getattr(ctx, "deployment", None) is not None:
            metrics.count_request(ctx.deployment, resp.status_code)


# --------------------------------------------------------------------------- inference


def read_body(req: falcon.Request, limit: int) -> bytes:
    if req.content_length is not None and req.content_length > limit:
        raise BodyTooLarge("request body exceeds %d bytes" % limit)
    data = req.bounded_stream.read(limit + 1)
    if len(data) > limit:
        raise BodyTooLarge("request body exceeds %d bytes" % limit)
    return data


class _Inference:
    def __init__(self, backend: Backend, config: ProxyConfig) -> None:
        self._backend = backend
        self._config = config

    def _start(self, req: falcon.Request, deployment: str, request: GenerateRequest) -> tuple[RequestStream, Item]:
        """Route and send the request, then wait for the replica's first event (headers not sent yet)."""
        ctx = req.context
        if not self._backend.has_deployment(deployment):
            if not self._backend.has_table():  # the model may well exist: say "later", not "never"
                raise NoHealthyReplica("no routing table received from the head yet")
            raise ModelNotFound(deployment)
        ctx.deployment = deployment
        stream = self._backend.open_stream(deployment, request)
        ctx.tracker = metrics.RequestTracker(deployment)
        log.debug("req=%s -> replica %s of %s", ctx.request_id, stream.replica_id, deployment)
        timeout = self._config.first_token_timeout
        try:
            first = stream.get(timeout)
        except BaseException:  # e.g. the worker is being killed: never leak an in-flight entry
            stream.close()
            raise
        if first is None:
            first = timeout_error(stream, timeout, True)
        err = as_error(first)
        if err is not None:
            stream.close()  # aborts at the replica if it never finished (timeout)
            raise UpstreamError.from_message(err)
        return stream, first


class OpenAIResource(_Inference):
    """POST /v1/chat/completions (kind CHAT) and POST /v1/completions."""

    def __init__(self, backend: Backend, config: ProxyConfig, kind: str) -> None:
        super().__init__(backend, config)
        self._kind = kind

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = req.context
        ctx.deployment = ""  # until the model is known to exist
        body = read_body(req, self._config.max_body_bytes)
        parsed = parse_chat(body) if self._kind == CHAT else parse_completion(body)
        rid = ctx.request_id
        stream, first = self._start(req, parsed.model, parsed.to_generate(rid))
        created = int(time.time())
        if parsed.stream:
            chunks = (ChatChunks if self._kind == CHAT else CompletionChunks)(rid, parsed.model, created)
            resp.content_type = "text/event-stream"
            resp.set_headers(SSE_HEADERS)
            resp.stream = SseBody(stream, first, self._config.idle_timeout, ctx.tracker, chunks,
                                  parsed.include_usage)
            ctx.streaming = True  # from here on the body's close() owns the stream
            return
        try:
            text, last = collect(stream, first, self._config.idle_timeout, ctx.tracker)
        finally:
            stream.close()
        render = chat_completion_body if self._kind == CHAT else text_completion_body
        resp.content_type = falcon.MEDIA_JSON
        resp.data = render(rid, parsed.model, created, text, last.finish_reason, last.prompt_tokens,
                           last.completion_tokens)


class PlainResource(_Inference):
    """POST /v1/chat/{deployment}: raw text prompt in, plain-text chunks out (legacy)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, deployment: str) -> None:
        req.context.deployment = ""
        body = read_body(req, self._config.max_body_bytes)
        prompt, params = parse_plain(body, req.get_param("max_tokens"))
        request = GenerateRequest(request_id=req.context.request_id, prompt=prompt, params=params)
        stream, first = self._start(req, deployment, request)
        req.context.streaming = True
        resp.content_type = "text/plain; charset=utf-8"
        resp.set_header("X-Accel-Buffering", "no")
        resp.stream = PlainBody(stream, first, self._config.idle_timeout, req.context.tracker)


# --------------------------------------------------------------------------- the rest


class ModelsResource:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        data = [{"id": d.name, "object": "model", "created": self._backend.started_at, "owned_by": "tokenrelay"}
                for d in self._backend.deployments()]
        resp.content_type = falcon.MEDIA_JSON
        resp.data = _json({"object": "list", "data": data})


class HealthResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = b'{"status":"ok"}'


class ReadyResource:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ready, reason = self._backend.readiness()
        resp.content_type = falcon.MEDIA_JSON
        if ready:
            resp.data = b'{"status":"ready"}'
        else:
            resp.status = falcon.HTTP_503
            resp.data = _json({"status": "not_ready", "reason": reason})


class MetricsResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        data, content_type = metrics.render()
        resp.content_type = content_type
        resp.data = data


# --------------------------------------------------------------------------- errors


def _rid(req: falcon.Request) -> str:
    return getattr(req.context, "request_id", "-")


def _write_error(resp: falcon.Response, status: int, body: dict[str, Any],
                 headers: Optional[dict[str, str]]) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = _json(body)
    resp.stream = None
    if headers:
        resp.set_headers(headers)


def _on_proxy_error(req: falcon.Request, resp: falcon.Response, ex: ProxyError, params: dict) -> None:
    log.log(logging.WARNING if ex.status >= 500 else logging.INFO, "req=%s %s %s -> %d %s",
            _rid(req), req.method, req.path, ex.status, ex.message)
    _write_error(resp, ex.status, ex.body(), ex.headers)


def _http_error_body(ex: falcon.HTTPError) -> dict[str, Any]:
    status = ex.status_code
    message = ex.description or ex.title or str(status)
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return error_body(message, error_type_for(status), None, code)


def _serialize_http_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError) -> None:
    resp.content_type = falcon.MEDIA_JSON
    resp.data = _json(_http_error_body(ex))


def _on_http_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: dict) -> None:
    log.info("req=%s %s %s -> %d %s", _rid(req), req.method, req.path, ex.status_code, ex.title)
    _write_error(resp, ex.status_code, _http_error_body(ex), dict(ex.headers or {}))


def _on_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    log.exception("req=%s %s %s -> 500 unexpected error", _rid(req), req.method, req.path)
    _write_error(resp, 500, error_body("internal proxy error: %s" % type(ex).__name__, "server_error"), None)
