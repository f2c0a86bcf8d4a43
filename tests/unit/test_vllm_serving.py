"""Unit tests for model_proc.vllm_serving's pure parts (no vLLM needed): engine_args as `vllm serve`
options, token accounting of relayed requests, error bodies. The app itself runs in tests/vllm."""
from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace
from typing import Any, Optional

import pytest

from model_proc.vllm_serving import Relayed, ServingApp, error_fields, record_output, serve_argv
from tests.support import RecordingSink

pytestmark = pytest.mark.unit


def actions(*flags: str) -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    for flag in flags:
        if flag.startswith("--no-"):
            continue
        parser.add_argument(flag, action=argparse.BooleanOptionalAction if "--no-" + flag[2:] in flags else None)
    return parser._option_string_actions


def test_engine_args_become_serve_options() -> None:
    acts = actions("--max-model-len", "--enforce-eager", "--no-enforce-eager", "--enable-auto-tool-choice",
                   "--hf-overrides", "--served-model-name", "--chat-template")
    argv = serve_argv({"max_model_len": 512, "enforce_eager": False, "enable_auto_tool_choice": True,
                       "hf_overrides": {"a": 1}, "served_model_name": ["x", "y"], "chat_template": None}, acts)
    assert argv == ["--max-model-len", "512", "--no-enforce-eager", "--enable-auto-tool-choice",
                    "--hf-overrides", '{"a": 1}', "--served-model-name", "x", "y"]


def test_a_false_store_true_option_is_its_default() -> None:
    assert serve_argv({"enable_auto_tool_choice": False}, actions("--enable-auto-tool-choice")) == []


def test_unknown_engine_arg_is_named() -> None:
    with pytest.raises(ValueError, match="engine_args.tool_parser is not a `vllm serve` option"):
        serve_argv({"tool_parser": "x"}, actions("--tool-call-parser"))


def out(prompt: list[int] | None, *completions: list[int]) -> SimpleNamespace:
    return SimpleNamespace(prompt_token_ids=prompt,
                           outputs=[SimpleNamespace(token_ids=ids) for ids in completions])


def test_delta_outputs_add_up_across_choices_and_engine_requests() -> None:
    rec = Relayed("r")
    record_output(rec, "a", out([1, 2, 3], [7], [8]), delta=True)  # n=2
    record_output(rec, "a", out(None, [9], [10]), delta=True)
    record_output(rec, "b", out([4], [5]), delta=True)  # a second prompt of a list prompt
    assert (rec.prompt_total, rec.completion_total) == (4, 5)
    assert rec.token_ids == {"a": [7, 9], "b": [5]}  # choice 0's ids: what a resume needs


def test_cumulative_outputs_replace() -> None:
    rec = Relayed("r")
    record_output(rec, "a", out([1], [7, 8]), delta=False)
    record_output(rec, "a", out([1], [7, 8, 9]), delta=False)
    assert (rec.prompt_total, rec.completion_total, rec.token_ids["a"]) == (1, 3, [7, 8, 9])


def test_error_fields() -> None:
    body = b'{"error":{"message":"m","type":"BadRequestError","param":"messages","code":400}}'
    assert error_fields(body) == ("m", "BadRequestError", "messages")
    assert error_fields(b"Internal Server Error") == ("Internal Server Error", "server_error", None)


def _serve(body: bytes, headers: Optional[dict[str, str]] = None) -> tuple[list[dict[str, Any]], RecordingSink]:
    """Run one relayed request through ServingApp into a stand-in for vLLM's app (it answers 400, as
    vLLM's does for what it cannot parse) and return the scopes the app saw and the sink."""
    scopes: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scopes.append(scope)
        await receive()
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b'{"detail":"There was an error parsing the body"}'})

    sink = RecordingSink()

    async def main() -> None:
        serving = ServingApp(app, sink)
        serving.submit("r1", "/v1/completions", body, headers=headers)
        while len(serving):
            await asyncio.sleep(0)

    asyncio.run(main())
    return scopes, sink


def test_a_deeply_nested_streamed_body_is_vllms_to_answer() -> None:
    """A body with "stream" is parsed here (can it be resumed?): one nested too deeply raised
    RecursionError out of submit, a 500, where `vllm serve` answers 400."""
    deep = b"[" * 5000 + b"]" * 5000
    scopes, sink = _serve(b'{"model":"m","prompt":"a","stream":true,"x":%s}' % deep)
    assert len(scopes) == 1 and [s for _, s, _ in sink.errors] == [400]


def test_the_clients_headers_reach_vllms_app() -> None:
    """vLLM's app refuses a Content-Type other than JSON (and none) with its 400, and a data-parallel rank
    it does not have: it must see the client's headers (the relayed ones), not a fixed JSON one."""
    def seen(headers: Optional[dict[str, str]]) -> dict[bytes, bytes]:
        scopes, _ = _serve(b'{"model":"m"}', headers)
        got = dict(scopes[0]["headers"])
        assert got.pop(b"content-length") == b"13" and got.pop(b"x-request-id") == b"r1"
        return got

    assert seen(None) == {b"content-type": b"application/json"}  # from a proxy that sends no headers
    assert seen({}) == {}
    assert seen({"content-type": "text/plain; charset=x", "x-data-parallel-rank": "3"}) == {
        b"content-type": b"text/plain; charset=x", b"x-data-parallel-rank": b"3"}


def test_vllms_answer_is_named_as_in_vllm_serve() -> None:
    """`chatcmpl-<id>`: the client's X-Request-ID (the proxy sends it when usable), else the body's
    `request_id`, which vLLM's app takes when no header names another; else the relayed request's id.
    The answer was always named after the proxy's own id."""
    def request_id(body: bytes, headers: Optional[dict[str, str]]) -> Optional[bytes]:
        scopes, _ = _serve(body, headers)
        return dict(scopes[0]["headers"]).get(b"x-request-id")

    assert request_id(b'{"prompt":"a"}', {"x-request-id": "client"}) == b"client"
    assert request_id(b'{"prompt":"a","request_id":"mine"}', {"x-request-id": "client"}) == b"client"
    assert request_id(b'{"prompt":"a","request_id":"mine"}', {}) is None
    assert request_id(b'{"prompt":"\\"request_id\\"","request_id":5}', {}) == b"r1"
    assert request_id(b'{"prompt":"a"}', {}) == b"r1"


def _serve_app(app) -> RecordingSink:
    async def go() -> RecordingSink:
        sink = RecordingSink()
        serving = ServingApp(app, sink)
        serving.submit("r", "/v1/completions", b'{"prompt": "x"}')
        while len(serving):
            await asyncio.sleep(0.001)
        return sink
    return asyncio.run(asyncio.wait_for(go(), 5))


def test_a_response_the_app_leaves_unfinished_ends_the_request_with_an_error() -> None:
    """Every request ends with one final emit or one error: before, an app call that returned after a
    body part with more_body left the request open at the replica (its slot, its client) for good."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    sink = _serve_app(app)
    assert sink.emits == [("r", "data: {}\n\n", None)]
    assert sink.errors == [("r", 500, "vLLM's app ended the response before its last part")]


def test_a_finished_response_is_one_final_emit_and_no_error() -> None:
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    sink = _serve_app(app)
    assert sink.emits == [("r", "{}", "stop")] and sink.errors == []
