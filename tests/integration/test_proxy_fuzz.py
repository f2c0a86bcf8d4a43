"""Fuzz the running proxy (real stack, mock engine) against its own OpenAPI document with schemathesis.

Every operation of proxy/openapi.py gets up to MAX_EXAMPLES generated requests, valid ones and invalid
ones: no 5xx, no hang (a per-request timeout), every status, content type, header and body as
documented, invalid input refused with a 4xx. Schema-valid requests may still be refused by design
(an unknown model is 404, a prompt longer than the replica's context is 400), so the check that valid
data is accepted is left out.
"""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from proxy.openapi import SPEC
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 40
MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 1,
        "engine_args": {"ttft_ms": 0, "itl_ms": 0, "tokens": 4, "max_context": 64}}

schema = schemathesis.openapi.from_dict(SPEC)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = Stack(tmp_path_factory.mktemp("fuzz"), [MOCK], workers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENRELAY_PROXY_MAX_BODY_BYTES", "65536")
        s.start()
    yield s
    s.stop()


def test_the_served_document_is_the_one_fuzzed(stack: Stack) -> None:
    assert httpx.get(stack.base_url + "/openapi.json").json() == httpx.Response(200, json=SPEC).json()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case, stack: Stack) -> None:
    response = case.call(base_url=stack.base_url, timeout=10)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    assert response.headers.get("x-request-id"), "every response has an X-Request-ID"
    content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: header -> values
    if response.status_code >= 400 and content_type.startswith("application/json"):
        err = response.json().get("error")
        if err is not None:  # /ready's own 503 body aside, every error is OpenAI's shape
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
