"""The proxy's Falcon WSGI app: OpenAI-compatible routes, request ids, errors in OpenAI's shape.

Runs in each proxy worker, one greenlet per HTTP request. Owns no socket: routing and replica I/O go
through the injected Backend (gateway.Gateway in production, a fake in unit tests) and a Dispatch per
request (dispatch.py). Must never answer with a hang or a 200 without a body. Headers wait for the
replica's first token, so errors before it get a real HTTP status; only a stream that waited
`keepalive_interval` without a token gets its headers early, then SSE keep-alive comments, and any
later failure becomes an SSE error event.

Routes:
  POST /v1/chat/completions   POST /v1/completions   POST /v1/responses   POST /tokenize   POST /detokenize
  POST /v1/chat/{deployment} (legacy plain text)
  GET /v1/models   GET /health   GET /ready   GET /metrics   GET /openapi.json
  GET /v1/responses/{id}   POST /v1/responses/{id}/cancel (404 as `vllm serve` without its store)

OpenAI routes of deployments whose engine serves the OpenAI API itself (vLLM) are relayed: the proxy reads
model and stream, sends the body as it is, and writes back the bytes the replica's serving layer wrote
(openai_request.py says which fields the proxy maps itself for the other engines).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Protocol

import falcon
import msgspec

from proxy import metrics
from proxy.access import ApiKeys, RateLimiter, load_api_keys
from proxy.bodies import BodyLimits, PlainBody, RelayBody, SseBody, collect
from proxy.chunks import ChatChunks, CompletionChunks, chat_completion_body, text_completion_body
from proxy.config import ProxyConfig
from proxy.dispatch import Cluster, Dispatch, Limits
from proxy.errors import (
    ClientGone, InvalidRequest, ModelNotFound, NoHealthyReplica, ProxyError, ResponseNotFound, error_body,
)
from proxy.gunicorn_hooks import LINGER_ENV
from proxy.middleware import AccessControl, RequestContext, client_probe
from proxy.openai_request import (
    CHAT, COMPLETION, ENDPOINT_KINDS, RELAY_ENGINES, parse_chat, parse_completion, parse_plain, plain_max_tokens,
    Routing, prompt_text, relayed_headers, routing_fields,
)
from proxy.openapi import SPEC
from proxy.request_body import parse_json, read_body, require_media
from proxy.router import route_key
from runtime.protocol import Delta, DeploymentRoute, GenerateRequest, error_type_for

log = logging.getLogger(__name__)

_json = msgspec.json.encode
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Backend(Cluster, Protocol):
    started_at: int
    clock: Callable[[], float]

    def next_request_id(self) -> str: ...
    def has_table(self) -> bool: ...
    def deployment(self, name: str) -> Optional[DeploymentRoute]: ...
    def deployments(self) -> list[DeploymentRoute]: ...
    def readiness(self) -> tuple[bool, str]: ...


def create_app(backend: Backend, config: ProxyConfig, keys: Optional[ApiKeys] = None) -> falcon.App:
    keys = load_api_keys(config.api_keys_file) if keys is None else keys
    access = AccessControl(keys, RateLimiter(config.workers), config.rate_limit, config.protect_health,
                           backend.clock)
    middleware: list[Any] = [RequestContext(backend.next_request_id, backend.clock), access]
    origins = config.cors_origin_list
    if origins:  # the browser may read answers (errors included) and X-Request-ID / Retry-After
        middleware.insert(0, falcon.CORSMiddleware(allow_origins="*" if "*" in origins else origins,
                                                   expose_headers=["X-Request-ID", "Retry-After"]))
    app = falcon.App(middleware=middleware)
    for path in ENDPOINT_KINDS:
        app.add_route(path, OpenAIResource(backend, config, path))
    app.add_route("/v1/chat/{deployment}", PlainResource(backend, config))
    stored = StoredResponseResource()
    app.add_route("/v1/responses/{response_id}", stored)
    app.add_route("/v1/responses/{response_id}/cancel", stored, suffix="cancel")
    app.add_route("/v1/models", ModelsResource(backend))
    app.add_route("/health", HealthResource())
    app.add_route("/ready", ReadyResource(backend))
    app.add_route("/metrics", MetricsResource())
    app.add_route("/openapi.json", OpenApiResource())
    app.add_error_handler(Exception, _on_unexpected)
    app.add_error_handler(falcon.HTTPError, _on_http_error)
    app.add_error_handler(ProxyError, _on_proxy_error)
    app.set_error_serializer(_serialize_http_error)
    return app


# --------------------------------------------------------------------------- inference


BIG_UNREAD = 65536  # an unread body larger than this is not drained by the worker: the connection closes


class _Inference:
    def __init__(self, backend: Backend, config: ProxyConfig) -> None:
        self._backend = backend
        self._config = config

    def _route(self, deployment: str) -> DeploymentRoute:
        route = self._backend.deployment(deployment)
        if route is None:
            if not self._backend.has_table():  # the model may well exist: say "later", not "never"
                raise NoHealthyReplica("no routing table received from the head yet")
            raise ModelNotFound(deployment)
        return route

    def _start(self, req: falcon.Request, deployment: str, request: GenerateRequest, prompt: str,
               streaming: bool, whole: bool = False) -> tuple[Dispatch, Optional[Delta], BodyLimits]:
        """Admit, route and send the request, then wait for its first token (headers not sent yet).
        The first token is None only when `streaming` and none came within the keep-alive interval.
        `whole`: the replica answers only at the end (a relayed non-streamed request: vLLM hands it the
        final output only), so the first-token and idle timeouts are the total one."""
        ctx = req.context
        route = self._route(deployment)
        ctx.deployment = deployment
        cfg, timeouts, rs = self._config, route.timeouts, route.routing
        total = timeouts.total_s or cfg.total_timeout
        first_token = total if whole else timeouts.first_token_s or cfg.first_token_timeout
        # a relayed whole answer (nothing sent before its end) starts over on another replica; a relayed
        # stream resumes where the replica reported its token ids (Dispatch.resumable)
        limits = Limits(first_token=first_token, total=total, max_attempts=cfg.max_attempts,
                        retry_window=cfg.retry_window, resume=rs.resume, max_resumes=cfg.max_resumes,
                        restart=bool(request.endpoint) and whole)
        body_limits = BodyLimits(idle=total if whole else timeouts.idle_s or cfg.idle_timeout,
                                 keepalive=cfg.keepalive_interval, max_chunk=cfg.max_chunk_chars)
        key = route_key(rs.policy, rs.prefix_chars, rs.session_affinity, req.get_header("X-Session-ID"), prompt)
        dispatch = Dispatch(self._backend, deployment, request, key, limits, self._backend.clock,
                            client_probe(req.env), started_at=ctx.started)
        ctx.tracker = metrics.RequestTracker(deployment)
        try:
            dispatch.admit()
            log.debug("req=%s -> replica %s of %s", ctx.request_id,
                      dispatch.stream.replica_id if dispatch.stream else "-", deployment)
            first = dispatch.first(cfg.keepalive_interval if streaming else None)
        except BaseException:  # e.g. the worker is being killed: never leak an in-flight entry
            dispatch.close()
            raise
        return dispatch, first, body_limits


class OpenAIResource(_Inference):
    """POST one of the OpenAI routes (ENDPOINT_KINDS): relayed, or mapped for engines in neither."""

    def __init__(self, backend: Backend, config: ProxyConfig, endpoint: str) -> None:
        super().__init__(backend, config)
        self._endpoint = endpoint
        self._kind = ENDPOINT_KINDS[endpoint]

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = req.context
        ctx.deployment = ""  # until the model is known to exist
        body = read_body(req, self._config.max_body_bytes, self._config.body_timeout, self._config.body_min_rate)
        fields = routing_fields(body)
        model, route = self._deployment_for(req, fields)
        if route.engine in RELAY_ENGINES:
            self._relay(req, resp, model, route, body, fields.stream)
            return
        if self._kind not in (CHAT, COMPLETION):
            raise InvalidRequest("%s is not served by this deployment's engine (%s); see docs/api.md"
                                 % (self._endpoint, route.engine))
        parse = parse_chat if self._kind == CHAT else parse_completion
        parsed = parse_json(lambda b: parse(b, route.engine), body)
        rid = ctx.request_id
        dispatch, first, limits = self._start(req, parsed.model, parsed.to_generate(rid), parsed.routing_text(),
                                              parsed.stream)
        created = int(time.time())
        if parsed.stream:
            chunks = (ChatChunks if self._kind == CHAT else CompletionChunks)(rid, parsed.model, created)
            resp.content_type = "text/event-stream"
            resp.set_headers(SSE_HEADERS)
            environ = req.env if self._config.direct_writes else None
            resp.stream = SseBody(dispatch, first, limits, ctx.tracker, chunks, parsed.include_usage, environ)
            ctx.streaming = True  # from here on the body's close() owns the stream
            return
        assert first is not None
        try:
            text, last = collect(dispatch, first, limits, ctx.tracker)
        except ClientGone:
            dispatch.close("client_gone")
            raise
        finally:
            dispatch.close("error")  # only an unfinished (failed) request is aborted
        render = chat_completion_body if self._kind == CHAT else text_completion_body
        resp.content_type = falcon.MEDIA_JSON
        resp.data = render(rid, parsed.model, created, text, last.finish_reason, last.prompt_tokens,
                           last.completion_tokens)

    def _deployment_for(self, req: falcon.Request, fields: Routing) -> tuple[str, DeploymentRoute]:
        """The deployment that answers: the one `model` names; else (no usable model, an unknown one, a
        body that is not a JSON object) the only deployment when it is a vLLM one, whose app then answers
        what `vllm serve` (one model) answers: its own 400 for the body or `stream`, its 404 for the
        model, a model-less body served. Otherwise the proxy answers itself (415, 400, 404)."""
        named = self._backend.deployment(fields.model) if fields.model is not None else None
        if named is not None and named.engine in RELAY_ENGINES:
            return named.name, named
        deployments = self._backend.deployments() if named is None and self._backend.has_table() else []
        if len(deployments) == 1 and deployments[0].engine in RELAY_ENGINES:
            return deployments[0].name, deployments[0]
        require_media(req, ("application/json",))
        if fields.problem is not None:
            raise fields.problem
        if fields.model is None:
            raise InvalidRequest("'model' is required", param="model")
        return fields.model, self._route(fields.model)

    def _relay(self, req: falcon.Request, resp: falcon.Response, model: str, route: DeploymentRoute,
               body: bytes, stream: bool) -> None:
        """Send the body as it is; write back what the replica's serving layer wrote."""
        ctx = req.context
        headers = relayed_headers(req.env)
        if ctx.client_request_id != ctx.request_id:  # the client's (usable) id names vLLM's answer
            headers["x-request-id"] = ctx.client_request_id
        request = GenerateRequest(request_id=ctx.request_id, endpoint=self._endpoint, body=body, headers=headers)
        prompt = prompt_text(body, route.routing.prefix_chars) if route.routing.policy == "prefix" else ""
        streaming = stream and self._kind not in ("tokenize", "detokenize")
        dispatch, first, limits = self._start(req, model, request, prompt, streaming, whole=not streaming)
        if streaming:
            resp.content_type = "text/event-stream; charset=utf-8"
            resp.set_headers(SSE_HEADERS)
            environ = req.env if self._config.direct_writes else None
            resp.stream = RelayBody(dispatch, first, limits, ctx.tracker, environ)
            ctx.streaming = True  # from here on the body's close() owns the stream
            return
        assert first is not None
        try:
            text, _ = collect(dispatch, first, limits, ctx.tracker)
        finally:
            dispatch.close("error")  # only an unfinished (failed) request is aborted
        resp.content_type = falcon.MEDIA_JSON
        resp.data = text.encode()


class StoredResponseResource:
    """GET /v1/responses/{id} and POST /v1/responses/{id}/cancel. `vllm serve` keeps Responses API
    answers only with VLLM_ENABLE_RESPONSES_API_STORE (off by default), in one process's memory; behind a
    router a stored answer would live in one replica, so tokenrelay stores none and answers both as `vllm
    serve` does for an id it does not hold: 404, param response_id."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, response_id: str) -> None:
        raise ResponseNotFound(response_id)

    def on_post_cancel(self, req: falcon.Request, resp: falcon.Response, response_id: str) -> None:
        raise ResponseNotFound(response_id)


class PlainResource(_Inference):
    """POST /v1/chat/{deployment}: raw text prompt in, plain-text chunks out (legacy)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, deployment: str) -> None:
        req.context.deployment = ""
        require_media(req, ("text/*", "application/octet-stream"))
        max_tokens = plain_max_tokens(req.params)
        body = read_body(req, self._config.max_body_bytes, self._config.body_timeout, self._config.body_min_rate)
        prompt, params = parse_plain(body, max_tokens)
        request = GenerateRequest(request_id=req.context.request_id, prompt=prompt, params=params)
        dispatch, first, limits = self._start(req, deployment, request, prompt, False)
        req.context.streaming = True
        resp.content_type = "text/plain; charset=utf-8"
        resp.set_header("X-Accel-Buffering", "no")
        environ = req.env if self._config.direct_writes else None
        resp.stream = PlainBody(dispatch, first, limits, req.context.tracker, environ)


# --------------------------------------------------------------------------- the rest


class ModelsResource:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        data = [model_card(d, self._backend.started_at) for d in self._backend.deployments()]
        resp.content_type = falcon.MEDIA_JSON
        resp.data = _json({"object": "list", "data": data})


def model_card(d: DeploymentRoute, started_at: int) -> dict[str, Any]:
    """A deployment's `/v1/models` entry: its engine's own (a vLLM replica reports the one `vllm serve`
    lists: max_model_len, root, permission; `created` is now, as there), else one the proxy writes."""
    if d.model_card:
        try:
            card = msgspec.json.decode(d.model_card)
        except msgspec.DecodeError:
            card = None
        if isinstance(card, dict) and card.get("id") == d.name:
            card["created"] = int(time.time())
            return card
        log.warning("deployment %s: its replica's model card is not an entry for it; using the proxy's", d.name)
    return {"id": d.name, "object": "model", "created": started_at, "owned_by": "tokenrelay"}


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
        if ready and reason == "ok":
            resp.data = b'{"status":"ready"}'
        elif ready:  # e.g. the head is unreachable: still serving, and saying so
            resp.data = _json({"status": "ready", "reason": reason})
        else:
            resp.status = falcon.HTTP_503
            resp.data = _json({"status": "not_ready", "reason": reason})


class MetricsResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        data, content_type = metrics.render()
        resp.content_type = content_type
        resp.data = data


class OpenApiResource:
    def __init__(self) -> None:
        self._data = _json(SPEC)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._data


# --------------------------------------------------------------------------- errors


LOG_MESSAGE_CHARS = 300  # of an error message in its log line; the client still gets all of it


def _clip(message: str) -> str:
    """An error message as its log line shows it: messages echo what the client sent (a model name, a
    field name), and one 16 MiB model name made a 16 MiB log line, so each request could grow the log by
    as much as it sent."""
    if len(message) <= LOG_MESSAGE_CHARS:
        return message
    return "%s... (%d chars)" % (message[:LOG_MESSAGE_CHARS], len(message))


def _rid(req: falcon.Request) -> str:
    return getattr(req.context, "request_id", "-")


def _close_if_body_unread(req: falcon.Request) -> None:
    """An error answered before a big (or chunked) body was read: ask the server hook to close the
    connection after the response (server.py, linger_close) instead of letting gunicorn drain the
    body through the worker, which would hold the worker's other streams while it comes in."""
    if getattr(req.context, "body_read", False):
        return
    length = req.content_length
    if (length is not None and length > BIG_UNREAD) or (length is None and req.get_header("Transfer-Encoding")):
        req.env[LINGER_ENV] = True


def _write_error(resp: falcon.Response, status: int, body: dict[str, Any],
                 headers: Optional[dict[str, str]], raw: Optional[bytes] = None) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = raw if raw is not None else _json(body)
    resp.stream = None
    if headers:
        resp.set_headers(headers)


def _on_proxy_error(req: falcon.Request, resp: falcon.Response, ex: ProxyError, params: dict) -> None:
    log.log(logging.WARNING if ex.status >= 500 else logging.INFO, "req=%s %s %s -> %d %s",
            _rid(req), req.method, req.path, ex.status, _clip(ex.message))
    _close_if_body_unread(req)
    _write_error(resp, ex.status, ex.body(), ex.headers, ex.raw)


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
    _close_if_body_unread(req)
    _write_error(resp, ex.status_code, _http_error_body(ex), dict(ex.headers or {}))


def _on_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    log.exception("req=%s %s %s -> 500 unexpected error", _rid(req), req.method, req.path)
    _write_error(resp, 500, error_body("internal proxy error: %s" % type(ex).__name__, "server_error"), None)
