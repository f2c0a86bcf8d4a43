"""Every status the proxy can answer with is in its OpenAPI document, for every operation it applies to."""
from __future__ import annotations

import inspect

from proxy import errors
from proxy.openapi import SPEC

# made by gunicorn itself for requests it cannot parse (proxy/gunicorn_hooks.py turns them into JSON)
SERVER_STATUSES = {400, 414, 417, 431, 500, 501}
NEVER_SENT = {499}  # nginx's "client closed request": metrics and logs only


def _app_statuses() -> set[int]:
    return {cls.status for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.ProxyError) and cls is not errors.ProxyError} - NEVER_SENT


def test_inference_operations_list_every_status_the_proxy_can_return() -> None:
    wanted = {str(s) for s in _app_statuses() | SERVER_STATUSES | {404}}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/chat/{deployment}"):
        listed = set(SPEC["paths"][path]["post"]["responses"])
        assert wanted - {"200"} <= listed, (path, sorted(wanted - listed))


def test_every_operation_lists_the_http_servers_own_errors() -> None:
    for path, methods in SPEC["paths"].items():
        for method, op in methods.items():
            assert {str(s) for s in SERVER_STATUSES} <= set(op["responses"]), (path, method)
