"""Unit tests for model_proc.vllm_serving's pure parts (no vLLM needed): engine_args as `vllm serve`
options, token accounting of relayed requests, error bodies. The app itself runs in tests/vllm."""
from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import pytest

from model_proc.vllm_serving import Relayed, ServingApp, error_fields, record_output, serve_argv

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


class _Sink:
    def __init__(self) -> None:
        self.emits: list = []
        self.errors: list = []

    def emit(self, rid, text, finish, prompt_tokens, completion_tokens, token_ids=()):
        self.emits.append((rid, text, finish))

    def error(self, rid, status, message, param=None, body=b""):
        self.errors.append((rid, status, message))


def _serve(app) -> _Sink:
    async def go() -> _Sink:
        sink = _Sink()
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

    sink = _serve(app)
    assert sink.emits == [("r", "data: {}\n\n", None)]
    assert sink.errors == [("r", 500, "vLLM's app ended the response before its last part")]


def test_a_finished_response_is_one_final_emit_and_no_error() -> None:
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    sink = _serve(app)
    assert sink.emits == [("r", "{}", "stop")] and sink.errors == []
