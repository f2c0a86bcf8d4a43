"""OpenAI API parity with `vllm serve` on a deployment with a tool parser and a reasoning parser both
(`tool_call_parser: hermes`, `enable_auto_tool_choice`, `reasoning_parser: deepseek_r1`), as reasoning
models with tools are served.

The tiny tool-and-reasoning model (tests/tiny_model.py, `build_tiny_tool_reasoning_model`: `<think>`,
`</think>`, `<tool_call>`, `</tool_call>` are tokens of its own; its chat template lists the tools, renders
tool calls and results, and opens a thought) is served once for the module by `vllm serve` and by a
tokenrelay stack with one vLLM replica, with the same options; every row of TABLE goes to both, streamed
(with usage) and not, and the answers must match field by field (test_conformance.py's helpers: status,
error type and param, content, reasoning, tool calls with ids left out, finish reasons, usage).

Steering a random-weight model: greedily it writes whitespace forever, which JSON allows anywhere, so a
forced tool call would never close; the rows bias whitespace-only tokens away (`logit_bias`, SPACE). Its
thought never ends either: `thinking_token_budget` ends it (reasoning, then the constrained tool call or
JSON), or a `logit_bias` on `</think>` (END) skips it. Tools are `strict`, so vLLM constrains the
arguments to their schema too (a city of at most 8 characters), not just the call's envelope.
"""
from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.vllm.harness import skip_without_vllm

skip_without_vllm()

from tests.vllm.test_conformance import cases as conformance_cases  # noqa: E402
from tests.vllm.test_conformance import (  # noqa: E402
    CHAT, GREEDY, MODEL, RESPONSES, USER, answer, diff, normalize, relay_stack, summary, vllm_server)
from tests.vllm.test_conformance_reasoning import settled, split  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(400)]

OPTIONS = {"max_model_len": 1024, "reasoning_parser": "deepseek_r1", "tool_call_parser": "hermes",
           "enable_auto_tool_choice": True}
VLLM_FLAGS = ["--served-model-name", MODEL, "--max-model-len", "1024", "--reasoning-parser", "deepseek_r1",
              "--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--dtype", "bfloat16",
              "--enforce-eager"]
# in a logit_bias, replaced by token ids (`with_ids`): every whitespace-only token, and `</think>`
SPACE, END = "<whitespace>", "</think>"
STEER = {"logit_bias": {SPACE: -100}, **GREEDY}

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": CITY, "strict": True}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "weather of a city",
                    "parameters": CITY, "strict": True}]
CALLED = USER + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
ONE_CALL = {"tool_choice": "required", "parallel_tool_calls": False, "thinking_token_budget": 3,
            "max_tokens": 60}

# (name, endpoint, body, streams): as in test_conformance.TABLE
TABLE: list[tuple[str, str, dict[str, Any], bool]] = [
    ("chat tools auto thinks", CHAT, {"messages": USER, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 8,
                                      **STEER}, True),
    ("chat tools auto thought ends", CHAT, {"messages": USER, "tools": TOOLS, "max_tokens": 8,
                                            "thinking_token_budget": 3, **STEER}, True),
    ("chat tools required: reasoning then a call", CHAT, {"messages": USER, "tools": TOOLS, **ONE_CALL, **STEER},
     True),
    ("chat tools named: reasoning then a call", CHAT, {"messages": USER, "tools": TOOLS, **ONE_CALL, **STEER,
                                                       "tool_choice": NAMED}, True),
    ("chat tools required, parallel, cut by max_tokens", CHAT, {
        "messages": USER, "tools": TOOLS, "tool_choice": "required", "thinking_token_budget": 3,
        "max_tokens": 70, **STEER}, True),
    ("chat tools required, thought never ends", CHAT, {"messages": USER, "tools": TOOLS, "tool_choice": "required",
                                                       "max_tokens": 8, **STEER}, True),
    ("chat tools required, thought skipped", CHAT, {"messages": USER, "tools": TOOLS, "tool_choice": "required",
                                                    "parallel_tool_calls": False, "max_tokens": 60, **GREEDY,
                                                    "logit_bias": {SPACE: -100, END: 100}}, True),
    ("chat tools none", CHAT, {"messages": USER, "tools": TOOLS, "tool_choice": "none", "max_tokens": 6,
                               "thinking_token_budget": 3, **STEER}, True),
    ("chat include_reasoning false, tools auto", CHAT, {"messages": USER, "tools": TOOLS, "max_tokens": 8,
                                                        "thinking_token_budget": 3, "include_reasoning": False,
                                                        **STEER}, True),
    # a thought closed in the prompt: the streamed call is parsed; vLLM's non-streamed parser takes the
    # whole output for reasoning (as in test_conformance_reasoning), hides it, and answers finish_reason
    # tool_calls with no tool call, on `vllm serve` as here
    ("chat include_reasoning false, forced call, no thought", CHAT, {
        "messages": USER, "tools": TOOLS, **ONE_CALL, **STEER, "include_reasoning": False,
        "chat_template_kwargs": {"enable_thinking": False}}, True),
    # vLLM 0.32 constrains a forced call from the first token when reasoning is hidden, so the `</think>`
    # that ends the budget is refused by the grammar: a 500 (a stream ends with an error event) from
    # `vllm serve` itself; tokenrelay answers the same
    ("chat include_reasoning false, forced call after a thought", CHAT, {
        "messages": USER, "tools": TOOLS, **ONE_CALL, **STEER, "include_reasoning": False}, True),
    ("chat tools, thinking closed in the prompt", CHAT, {"messages": USER, "tools": TOOLS, "max_tokens": 6, **STEER,
                                                         "chat_template_kwargs": {"enable_thinking": False}}, True),
    ("chat tool result turn", CHAT, {"messages": CALLED, "tools": TOOLS, "max_tokens": 6,
                                     "thinking_token_budget": 3, **STEER}, True),
    ("chat json_schema after reasoning", CHAT, {"messages": USER, "max_tokens": 30, "thinking_token_budget": 3,
                                                **STEER, "response_format": {"type": "json_schema", "json_schema": {
                                                    "name": "city", "schema": CITY}}}, True),
    ("chat required without tools", CHAT, {"messages": USER, "tool_choice": "required", "max_tokens": 4}, False),
    ("chat named tool not in tools", CHAT, {"messages": USER, "tools": TOOLS, "max_tokens": 4, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, False),
    ("chat bad tool_choice", CHAT, {"messages": USER, "tools": TOOLS, "tool_choice": "sometimes",
                                    "max_tokens": 4}, False),
    ("chat bad parallel_tool_calls", CHAT, {"messages": USER, "tools": TOOLS, "parallel_tool_calls": "x",
                                            "max_tokens": 4}, False),
    ("chat bad thinking_token_budget with tools", CHAT, {"messages": USER, "tools": TOOLS, "max_tokens": 4,
                                                         "tool_choice": "required", "thinking_token_budget": "x"},
     False),
    ("responses tools auto: reasoning item", RESPONSES, {"input": "The weather in Paris", "tools": RESPONSES_TOOLS,
                                                         "max_output_tokens": 8, **STEER}, True),
    ("responses tools required: function_call item", RESPONSES, {
        "input": "The weather in Paris", "tools": RESPONSES_TOOLS, "tool_choice": "required",
        "parallel_tool_calls": False, "max_output_tokens": 60, **GREEDY, "logit_bias": {SPACE: -100, END: 100}},
     True),
    ("responses bad tool_choice", RESPONSES, {"input": "x", "tools": RESPONSES_TOOLS, "tool_choice": "sometimes",
                                              "max_output_tokens": 4}, False),
]


def cases() -> list[tuple[str, str, dict[str, Any]]]:
    return conformance_cases(TABLE, lambda endpoint: {} if endpoint == RESPONSES else {
        "stream_options": {"include_usage": True}})


def with_ids(body: dict[str, Any], ids: dict[str, list[int]]) -> dict[str, Any]:
    """SPACE and END in a logit_bias replaced by their token ids."""
    if "logit_bias" not in body:
        return body
    bias: dict[str, int] = {}
    for key, value in body["logit_bias"].items():
        bias.update({str(i): value for i in ids[key]})
    return {**body, "logit_bias": bias}


@pytest.fixture(scope="module")
def model(vllm_env: Path) -> Path:
    from tests.tiny_model import build_tiny_tool_reasoning_model

    return build_tiny_tool_reasoning_model(vllm_env / "tiny-tools-reasoning")


@pytest.fixture(scope="module")
def ids(model: Path) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    space = [i for i in range(len(tok)) if not tok.decode([i]).strip()]
    return {SPACE: space, END: [tok.convert_tokens_to_ids(END)]}


@pytest.fixture(scope="module")
def servers(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`vllm serve` and the tokenrelay stack, started side by side (each start waits on its own engine)."""
    with contextlib.ExitStack() as started, ThreadPoolExecutor(1) as pool:
        serve = pool.submit(started.enter_context, vllm_server(
            model, VLLM_FLAGS, tmp_path_factory.mktemp("vllm-serve-tools-reasoning")))
        try:
            stack = started.enter_context(relay_stack(model, OPTIONS, tmp_path_factory.mktemp("relay-tools-reasoning")))
        finally:
            base = serve.result()  # on failure too: what it started is on `started`, to be stopped
        yield base, stack.base_url


@pytest.fixture(scope="module")
def vllm_serve(servers: tuple[str, str]) -> str:
    return servers[0]


@pytest.fixture(scope="module")
def relay(servers: tuple[str, str]) -> str:
    return servers[1]


def calls(got: dict[str, Any]) -> str:
    """The tool calls a chat answer holds: (name, arguments) each (for the table)."""
    if got["status"] != 200:
        return ""
    body = got.get("body") or got.get("stream") or {}
    if body.get("choices"):
        first = body["choices"][0]  # a list, or a stream's choices by index
        msg = first.get("message") or first.get("delta") or {}
        tool_calls = msg.get("tool_calls") or []
        found = tool_calls.values() if isinstance(tool_calls, dict) else tool_calls
        return ", calls %s" % [(c["function"].get("name"), c["function"].get("arguments")) for c in found]
    return ""


@pytest.mark.parametrize("name,endpoint,body", cases(), ids=[c[0] for c in cases()])
def test_same_answer(vllm_serve: str, relay: str, ids: dict[str, list[int]], name: str, endpoint: str,
                     body: dict[str, Any]) -> None:
    body = with_ids(body, ids)
    expected = settled(answer(vllm_serve, endpoint, body))
    got = settled(answer(relay, endpoint, body))
    print("\n%-52s %d %s%s%s" % (name, got["status"], summary(got), split(got), calls(got)))  # the table, -s
    assert diff(expected, got) is None, "%s: %s\nvllm: %s\ntokenrelay: %s" % (
        name, diff(expected, got), json.dumps(expected)[:2000], json.dumps(got)[:2000])


def rows(ids: dict[str, list[int]], *names: str) -> list[dict[str, Any]]:
    table = {name: body for name, _, body, _ in TABLE}
    return [with_ids({"model": MODEL, **table[name]}, ids) for name in names]


def test_the_rows_do_what_they_say(vllm_serve: str, ids: dict[str, list[int]]) -> None:
    """The table exercises both parsers (checked on `vllm serve`'s answers; tokenrelay's equal them): a
    forced call (required or named) comes after the reasoning, as a parsed tool call whose arguments fit
    the tool's schema, streamed and not; a json_schema answer follows the reasoning and parses;
    /v1/responses gives a reasoning item, or a function_call item when the call is forced."""
    required, named, schema, auto, forced = rows(
        ids, "chat tools required: reasoning then a call", "chat tools named: reasoning then a call",
        "chat json_schema after reasoning", "responses tools auto: reasoning item",
        "responses tools required: function_call item")
    for stream in (False, True):
        for body, finish in ((required, "tool_calls"), (named, "stop")):
            got = answer(vllm_serve, CHAT, {**body, "stream": stream})
            choice = (got.get("body") or got["stream"])["choices"][0]
            msg = choice.get("message") or choice["delta"]
            tool_calls = msg["tool_calls"] if not stream else list(msg["tool_calls"].values())
            assert msg["reasoning"] and choice["finish_reason"] == finish, choice
            assert [c["function"]["name"] for c in tool_calls] == ["get_weather"], tool_calls
            assert set(json.loads(tool_calls[0]["function"]["arguments"])) == {"city"}, tool_calls
        got = answer(vllm_serve, CHAT, {**schema, "stream": stream})
        choice = (got.get("body") or got["stream"])["choices"][0]
        msg = choice.get("message") or choice["delta"]
        assert msg["reasoning"] and set(json.loads(msg["content"])) == {"city"}, msg
    assert [item["type"] for item in answer(vllm_serve, RESPONSES, auto)["body"]["output"]] == ["reasoning"]
    assert [item["type"] for item in answer(vllm_serve, RESPONSES, forced)["body"]["output"]] == ["function_call"]


def test_the_official_client_gets_the_same(vllm_serve: str, relay: str, ids: dict[str, list[int]]) -> None:
    """The `openai` client's parsed objects match: a chat message with `reasoning` (an extra field to the
    client) and a forced tool call, required and named, and a Responses API function_call item."""
    openai = pytest.importorskip("openai")
    space = {str(i): -100 for i in ids[SPACE]}
    skip = {**space, str(ids[END][0]): 100}

    def replies(base: str) -> list[Any]:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        return [normalize(reply.model_dump()) for reply in (
            client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=60, temperature=0,
                                           logit_bias=space, extra_body={"thinking_token_budget": 3}),
            client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=NAMED,
                                           parallel_tool_calls=False, max_tokens=60, temperature=0,
                                           logit_bias=space, extra_body={"thinking_token_budget": 3}),
            client.responses.create(model=MODEL, input="The weather in Paris", tools=RESPONSES_TOOLS,
                                    tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                    temperature=0, extra_body={"logit_bias": skip}),
        )]

    expected, got = replies(vllm_serve), replies(relay)
    message = expected[0]["choices"][0]["message"]
    assert message["reasoning"] and message["tool_calls"], message
    assert expected[2]["output"][0]["type"] == "function_call", expected[2]["output"]
    assert diff(expected, got) is None, diff(expected, got)
