"""The proxy's exception hierarchy and the OpenAI error body every failure turns into.

Runs in proxy workers; owns no socket. Never raise anything but a ProxyError subclass at the HTTP edge:
app.py translates these (and Falcon's own HTTPError) into `{"error": {message, type, param, code}}`.

    ProxyError (status, message, type, param, code, headers)
     +-- InvalidRequest        400  invalid_request_error   bad JSON, bad field type/value (param names it)
     +-- Unauthorized          401  invalid_request_error   code invalid_api_key (missing or unknown key)
     +-- BodyTooLarge          413  invalid_request_error   code body_too_large
     +-- BodyTimeout           408  invalid_request_error   code request_timeout (body stalled)
     +-- UnsupportedMediaType  415  invalid_request_error   code unsupported_media_type
     +-- ModelNotFound         404  invalid_request_error   code model_not_found
     +-- ResponseNotFound      404  invalid_request_error   param response_id (no stored responses)
     +-- Overloaded            429  rate_limit_error        Retry-After; code overloaded (queue full/timeout)
     +-- RateLimited           429  rate_limit_error        Retry-After; code rate_limit_exceeded (API key)
     +-- NoHealthyReplica      503  server_error            Retry-After: 1; code no_healthy_replica
     +-- UpstreamError         any  from a replica's RequestError / ReplicaDead / lost connection
     +-- UpstreamTimeout       504  server_error            code timeout: first token, idle or total time
     +-- ClientGone            499  (nobody reads it)       the client left while its request waited
"""
from __future__ import annotations

from typing import Any, Optional

from runtime.protocol import RequestError


# codes of failures that reach the client as a replica-style RequestError (SSE error events included)
_UPSTREAM_CODES = {504: "timeout", 408: "slow_reader"}


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: Optional[str] = None

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 status: Optional[int] = None, type_: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type_ is not None:
            self.type = type_
        self.headers: dict[str, str] = headers or {}
        self.raw: Optional[bytes] = None  # a body to send as it is (a relayed engine's own error body)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "body_too_large"


class BodyTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class UnsupportedMediaType(ProxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class Overloaded(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after: str) -> None:
        super().__init__(message, headers={"Retry-After": retry_after})


class RateLimited(Overloaded):
    code = "rate_limit_exceeded"


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__("The model %r does not exist" % model, param="model")


class ResponseNotFound(ProxyError):
    """A stored Responses API response asked for by id: tokenrelay keeps none, and answers as `vllm serve`
    (whose store is off unless VLLM_ENABLE_RESPONSES_API_STORE is set) does for an id it does not hold."""

    status = 404
    type = "invalid_request_error"

    def __init__(self, response_id: str) -> None:
        super().__init__("Response with id '%s' not found." % response_id, param="response_id")


class NoHealthyReplica(ProxyError):
    status = 503
    type = "server_error"
    code = "no_healthy_replica"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class UpstreamError(ProxyError):
    """A failure reported by (or about) the replica serving the request."""

    @classmethod
    def from_message(cls, err: RequestError) -> "UpstreamError":
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        exc = cls(err.message, status=err.status, type_=err.type, param=err.param, headers=headers,
                  code=_UPSTREAM_CODES.get(err.status))
        exc.raw = err.body or None
        return exc


class ClientGone(ProxyError):
    """The client closed its connection while the request waited; the status is nginx's 499, for logs
    and metrics only."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the response started")


class UpstreamTimeout(ProxyError):
    status = 504
    type = "server_error"
    code = "timeout"
