"""Falcon middleware of the proxy: request ids and metrics (RequestContext), API keys and per-key rate
limits (AccessControl), and a probe that tells whether the client is still connected.

Runs in proxy workers on each request's greenlet; owns no socket (the probe only peeks, without
blocking, at the client socket gunicorn put in the WSGI environ). Must never let a request through
/v1 without a valid key when keys are configured, and never put a secret in a log line.
"""
from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Optional

import falcon

from proxy import metrics
from proxy.access import ApiKeys, RateLimiter
from proxy.admission import retry_after
from proxy.errors import RateLimited, Unauthorized

log = logging.getLogger(__name__)

HEALTH_PATHS = ("/health", "/ready", "/metrics")
PROBE_PATHS = ("/health", "/ready")  # a load balancer's (and the launcher's) probes: never rate-limited
OPENAPI_PATH = "/openapi.json"  # always open: it says how to authenticate


class RequestContext:
    """Gives every request an id (X-Request-ID echoed or generated) and counts inference results."""

    def __init__(self, next_request_id: Callable[[], str], clock: Callable[[], float]) -> None:
        self._next_id = next_request_id
        self._clock = clock

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        ctx = req.context
        ctx.started = self._clock()
        ctx.request_id = self._next_id()
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


class AccessControl:
    """With API keys configured: `Authorization: Bearer KEY` on every path but /openapi.json and the
    health endpoints (those too with `protect_health`), else 401; then the key's rate limit, else 429
    with Retry-After. Health endpoints never count against a rate limit: a load balancer (or the
    launcher of `tokenrelay up`) probing /ready with a key under `protect_health` used that key's whole
    budget, and the probe itself then failed with 429."""

    def __init__(self, keys: ApiKeys, limiter: RateLimiter, default_limit: int, protect_health: bool,
                 clock: Callable[[], float]) -> None:
        self._keys = keys
        self._limiter = limiter
        self._default_limit = default_limit
        self._protect_health = protect_health
        self._clock = clock

    def _protected(self, path: str) -> bool:
        """Every path but the OpenAPI document, and the health paths unless `protect_health`: a key is
        asked for by what is open, not by a prefix (vLLM's /tokenize and /detokenize are not under /v1)."""
        if path in HEALTH_PATHS:
            return self._protect_health
        return path != OPENAPI_PATH

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._keys.enabled or not self._protected(req.path):
            return
        if req.method == "OPTIONS" and req.get_header("Access-Control-Request-Method") is not None:
            return  # a browser's CORS preflight never carries credentials; it answers no data (--cors-origins)
        header = req.get_header("Authorization")
        key_id = self._keys.check(header)
        if key_id is None:
            metrics.AUTH_FAILURES.inc()
            if header:
                raise Unauthorized("Incorrect API key provided (use 'Authorization: Bearer KEY')")
            raise Unauthorized("You didn't provide an API key; send 'Authorization: Bearer KEY'")
        req.context.key_id = key_id
        if req.path in PROBE_PATHS:
            return
        allowed, wait = self._limiter.allow(key_id, self._keys.limit_of(key_id, self._default_limit),
                                            self._clock())
        if not allowed:
            metrics.REJECTED.labels("-", "rate_limited").inc()
            raise RateLimited("Rate limit reached for this API key; retry in %.1fs" % wait, retry_after(wait))


def client_probe(env: dict[str, Any]) -> Callable[[], bool]:
    """A cheap check that the client closed its connection (EOF on its socket), for use while a request
    waits before its first byte. Peeks without blocking and without consuming; False when unknown."""
    sock: Optional[Any] = env.get("gunicorn.socket")
    raw = getattr(sock, "_sock", sock)  # gevent's socket wraps the real one; recv on it never waits
    if raw is None or not hasattr(raw, "recv"):
        return lambda: False

    def gone() -> bool:
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False  # open, nothing sent: the normal case
        except OSError:
            return True  # reset or closed under us
    return gone
