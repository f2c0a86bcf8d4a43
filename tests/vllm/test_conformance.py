"""OpenAI API parity: the same requests to `vllm serve` and to tokenrelay (a vLLM replica) on the tiny model.

Starts each server once for the module: vLLM's own OpenAI server (`python -m
vllm.entrypoints.openai.api_server`, what `vllm serve` runs) and a tokenrelay stack (`python -m runtime up`)
with one vLLM replica, both with the same options (served name `tiny`, max_model_len 512, the pythonic
tool parser with auto tool choice; bf16, eager mode and the 1 GiB KV cache that tokenrelay applies on CPU
are passed to vLLM explicitly). Every row of TABLE goes to both, streamed and not where the endpoint
streams, and the answers must match field by field: status, error type and param, content, tool calls,
logprobs, finish reasons, usage. Ids and timestamps are random and are left out of the comparison.
Greedy decoding (or a fixed seed) makes the tiny model's gibberish the same on both.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from tests.vllm.harness import skip_without_vllm

skip_without_vllm()

import httpx  # noqa: E402

from tests.integration.stack import Stack  # noqa: E402
from tests.support import free_port, wait_for  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

MODEL = "tiny"
OPTIONS = {"max_model_len": 512, "tool_call_parser": "pythonic", "enable_auto_tool_choice": True}
VLLM_FLAGS = ["--served-model-name", MODEL, "--max-model-len", "512", "--tool-call-parser", "pythonic",
              "--enable-auto-tool-choice", "--dtype", "bfloat16", "--enforce-eager"]
# left out of the comparison: random ids and wall-clock times
VOLATILE = {"id", "created", "created_at", "completed_at", "item_id", "call_id", "response_id",
            "sequence_number"}  # and the number of a stream event, which depends on how tokens were chunked

USER = [{"role": "user", "content": "Tell me about the weather in Paris."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
GREEDY = {"temperature": 0.0}

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
# (name, endpoint, body, streams): every row is sent as is, and again with "stream": true when it streams
TABLE: list[tuple[str, str, dict[str, Any], bool]] = [
    ("chat greedy", CHAT, {"messages": USER, "max_tokens": 6, **GREEDY}, True),
    ("chat usage in stream", CHAT, {"messages": USER, "max_tokens": 4, "stream_options": {"include_usage": True},
                                    **GREEDY}, True),
    ("chat tools required", CHAT, {"messages": USER, "tools": TOOLS, "tool_choice": "required",
                                   "max_tokens": 24, **GREEDY}, True),
    ("chat tools named", CHAT, {"messages": USER, "tools": TOOLS, "max_tokens": 24, **GREEDY,
                                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, True),
    ("chat tools auto", CHAT, {"messages": USER, "tools": TOOLS, "tool_choice": "auto", "max_tokens": 8,
                               **GREEDY}, True),
    ("chat json_schema", CHAT, {"messages": USER, "max_tokens": 12, **GREEDY, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}, True),
    ("chat json_object", CHAT, {"messages": USER, "max_tokens": 8, "response_format": {"type": "json_object"},
                                **GREEDY}, True),
    ("chat logprobs", CHAT, {"messages": USER, "max_tokens": 4, "logprobs": True, "top_logprobs": 3, **GREEDY}, True),
    ("chat n=2 seed", CHAT, {"messages": USER, "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 7}, True),
    ("chat stop_token_ids min_tokens ignore_eos", CHAT, {"messages": USER, "max_tokens": 6, "min_tokens": 3,
                                                        "stop_token_ids": [5], "ignore_eos": True, **GREEDY}, True),
    ("chat penalties min_p logit_bias", CHAT, {"messages": USER, "max_tokens": 5, "repetition_penalty": 1.3,
                                              "min_p": 0.1, "logit_bias": {"7": 5}, "seed": 3}, True),
    ("chat continue_final_message", CHAT, {"messages": USER + [{"role": "assistant", "content": "It is"}],
                                           "continue_final_message": True, "add_generation_prompt": False,
                                           "max_tokens": 4, **GREEDY}, False),
    ("chat text content parts", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}], "max_tokens": 4, **GREEDY}, False),
    ("chat role wizard", CHAT, {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 3, **GREEDY},
     False),
    ("chat bad temperature", CHAT, {"messages": USER, "temperature": "hot"}, False),
    ("chat no messages", CHAT, {"max_tokens": 3}, False),
    ("chat too long", CHAT, {"messages": USER, "max_tokens": 100000}, False),
    ("chat logprobs too many", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 100}, False),
    ("completion greedy", COMPLETIONS, {"prompt": "The weather in Paris", "max_tokens": 6, **GREEDY}, True),
    ("completion echo logprobs", COMPLETIONS, {"prompt": "The weather", "max_tokens": 3, "echo": True,
                                               "logprobs": 2, **GREEDY}, False),
    ("completion list prompt", COMPLETIONS, {"prompt": ["one", "two"], "max_tokens": 3, **GREEDY}, True),
    ("completion token ids", COMPLETIONS, {"prompt": [5, 6, 7, 8], "max_tokens": 3, **GREEDY}, True),
    ("completion suffix", COMPLETIONS, {"prompt": "a", "suffix": "b", "max_tokens": 3}, False),
    ("completion bad n", COMPLETIONS, {"prompt": "a", "n": 0}, False),
    ("tokenize prompt", "/tokenize", {"prompt": "The weather in Paris"}, False),
    ("tokenize chat", "/tokenize", {"messages": USER, "add_generation_prompt": True}, False),
    ("detokenize", "/detokenize", {"tokens": [5, 6, 7, 8]}, False),
    ("responses greedy", RESPONSES, {"input": "The weather in Paris", "max_output_tokens": 6, **GREEDY}, True),
    ("responses json_schema", RESPONSES, {"input": "x", "max_output_tokens": 10, **GREEDY, "text": {
        "format": {"type": "json_schema", "name": "a", "schema": SCHEMA}}}, False),
    # what the proxy reads itself (model, stream), read as vllm serve reads it (found by differential fuzzing)
    ("chat stream as a string", CHAT, {"messages": USER, "max_tokens": 3, "stream": "true", **GREEDY}, False),
    ("completion stream as 0", COMPLETIONS, {"prompt": "a", "max_tokens": 3, "stream": 0, **GREEDY}, False),
    ("chat stream not a boolean", CHAT, {"messages": USER, "max_tokens": 3, "stream": [], **GREEDY}, False),
    ("completion empty model", COMPLETIONS, {"model": "", "prompt": "a", "max_tokens": 3, **GREEDY}, True),
    ("tokenize model not a string", "/tokenize", {"model": 5, "prompt": "a"}, False),
    ("detokenize unknown model and bad tokens", "/detokenize", {"model": "nope", "tokens": ["a"]}, False),
    ("responses unknown model", RESPONSES, {"model": "nope", "input": "x", "max_output_tokens": 3}, True),
]
JSON = {"Content-Type": "application/json"}
GOOD = b'{"model":"tiny","prompt":"The weather","max_tokens":3,"temperature":0'
# (name, endpoint, raw body, headers): bodies the proxy reads before vLLM does, headers vLLM reads
RAW: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("empty body", CHAT, b"", JSON),
    ("not JSON", COMPLETIONS, b"{", JSON),
    ("trailing data", COMPLETIONS, GOOD + b"}x", JSON),
    ("an array", "/tokenize", b"[]", JSON),
    ("nested too deeply", COMPLETIONS, GOOD + b',"x":' + b"[" * 3000 + b"]" * 3000 + b"}", JSON),
    ("nested too deeply, streamed", CHAT, b'{"messages":[],"stream":true,"x":' + b"[" * 3000 + b"]" * 3000 + b"}",
     JSON),
    ("a UTF-8 BOM", COMPLETIONS, b"\xef\xbb\xbf" + GOOD + b"}", JSON),
    ("NaN", COMPLETIONS, GOOD + b',"top_p":NaN}', JSON),
    ("no Content-Type", COMPLETIONS, GOOD + b"}", {}),
    ("text/plain", "/detokenize", b'{"model":"tiny","tokens":[5]}', {"Content-Type": "text/plain"}),
    ("a data-parallel rank it does not have", COMPLETIONS, GOOD + b"}", {**JSON, "X-data-parallel-rank": "3"}),
]
UNKNOWN_MODEL = ("chat unknown model", CHAT, {"model": "nope", "messages": USER, "max_tokens": 3})


def cases(table: Optional[list[tuple[str, str, dict[str, Any], bool]]] = None,
          stream_extra: Callable[[str], dict[str, Any]] = lambda endpoint: {}
          ) -> list[tuple[str, str, dict[str, Any]]]:
    """Every row of `table` (default TABLE) as (name, endpoint, body), and again streamed where it streams
    (with `stream_extra(endpoint)` added to the streamed body)."""
    out = []
    for name, endpoint, body, streams in TABLE if table is None else table:
        body = {"model": MODEL, **body}
        out.append((name, endpoint, body))
        if streams:
            out.append((name + " (stream)", endpoint, {**body, "stream": True, **stream_extra(endpoint)}))
    return out


def normalize(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, str) and value.startswith(("chatcmpl-", "cmpl-", "resp_", "msg_", "call_")):
        return "<id>"
    return value


def answer(base: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """What a client sees, normalized: status, media type, and the JSON body or the list of SSE events."""
    return seen(httpx.post(base + endpoint, json=body, timeout=120))


def seen(r: httpx.Response) -> dict[str, Any]:
    """An answer as `answer` normalizes it."""
    media = r.headers.get("content-type", "").split(";")[0]
    out: dict[str, Any] = {"status": r.status_code, "media": media}
    if media == "text/event-stream":
        events = []
        for block in r.text.split("\n\n"):
            for line in block.splitlines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    events.append(data if data == "[DONE]" else normalize(json.loads(data)))
                elif line.startswith("event: "):
                    events.append(line)
        out["stream"] = reassemble(events)
    else:
        out["body"] = normalize(r.json())
    return out


def _extend(acc: dict[str, Any], key: str, value: Any) -> None:
    """Merge one chunk's field into what the client has so far: text appends, lists extend, dicts merge,
    anything else (finish_reason, role) is the latest non-null value."""
    if value is None:
        acc.setdefault(key, None)
    elif isinstance(value, str) and key not in ("role", "finish_reason", "type", "name", "object", "model"):
        acc[key] = (acc.get(key) or "") + value
    elif isinstance(value, list) and key == "tool_calls":
        if not isinstance(acc.get(key), dict):
            acc[key] = {}
        for call in value:
            _merge(acc[key].setdefault(call.get("index", 0), {}), call)
    elif isinstance(value, list):
        acc[key] = (acc.get(key) or []) + value
    elif isinstance(value, dict):
        if not isinstance(acc.get(key), dict):
            acc[key] = {}
        _merge(acc[key], value)
    else:
        acc[key] = value


def _merge(acc: dict[str, Any], chunk: dict[str, Any]) -> None:
    for key, value in chunk.items():
        _extend(acc, key, value)


def reassemble(events: list[Any]) -> dict[str, Any]:
    """What a client rebuilds from a stream: the chunks merged per choice (content, tool call arguments and
    logprobs joined; finish reasons), the usage, or for the Responses API the completed response, the
    joined text deltas and the kinds of events. How the text was cut into chunks depends on timing (how
    many tokens an engine step handed over), on `vllm serve` as much as here, so it is not compared."""
    out: dict[str, Any] = {"done": events[-1:] == ["[DONE]"], "choices": {}, "kinds": []}
    for event in events:
        if isinstance(event, str):
            if event.startswith("event: ") and event not in out["kinds"]:
                out["kinds"].append(event)
            continue
        if "choices" in event:
            for choice in event["choices"]:
                _merge(out["choices"].setdefault(choice["index"], {}), choice)
            out["usage"] = event.get("usage") or out.get("usage")
            out["head"] = {k: v for k, v in event.items() if k not in ("choices", "usage")}
        elif event.get("type") == "response.output_text.delta":
            out["text"] = out.get("text", "") + event["delta"]
        elif event.get("type") in ("response.completed", "error") or "error" in event:
            out["final"] = event
    return out


def diff(a: Any, b: Any, path: str = "$") -> Optional[str]:
    """The first place where a and b differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return "%s.%s only on %s" % (path, key, "vllm" if key in a else "tokenrelay")
            d = diff(a[key], b[key], "%s.%s" % (path, key))
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return "%s: %d items on vllm, %d on tokenrelay" % (path, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = diff(x, y, "%s[%d]" % (path, i))
            if d:
                return d
        return None
    return None if a == b else "%s: vllm %r, tokenrelay %r" % (path, a, b)


def summary(got: dict[str, Any]) -> str:
    """One line saying what the answer held (for the table in the report)."""
    if got["status"] != 200:
        err = got.get("body", {}).get("error", {})
        return "%s param=%s" % (err.get("type"), err.get("param"))
    body = got.get("body") or got["stream"]
    choices = body.get("choices") if isinstance(body, dict) else None
    if isinstance(choices, dict):
        choices = list(choices.values())
    if choices:
        c = choices[0]
        msg = c.get("message") or c.get("delta") or {}
        what = "tool_calls" if msg.get("tool_calls") else "logprobs" if c.get("logprobs") else "text"
        return "%d choice(s), %s, finish=%s" % (len(choices), what, c.get("finish_reason"))
    return ",".join(sorted(body))[:60] if isinstance(body, dict) else ""


@contextlib.contextmanager
def vllm_server(model: Path, flags: list[str], log_dir: Path) -> Iterator[str]:
    """`vllm serve MODEL FLAGS` on a free port, logging to log_dir/vllm.log; yields its base URL once
    /health answers, stops it on exit."""
    port = free_port()
    log_path = log_dir / "vllm.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port)] + flags
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = "http://127.0.0.1:%d" % port

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError("vllm serve exited %s:\n%s" % (proc.returncode, log_path.read_text()[-3000:]))
        try:
            return httpx.get(base + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 240, "vllm serve /health")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def relay_stack(model: Path, engine_args: dict[str, Any], tmp: Path) -> Iterator[Stack]:
    """A tokenrelay stack (one proxy worker) with one vLLM replica of deployment MODEL, started."""
    deployment = {"name": MODEL, "engine": "vllm", "model": str(model), "replicas": 1,
                  "engine_args": engine_args}
    s = Stack(tmp, [deployment], workers=1)
    try:
        s.start(timeout=240)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def vllm_serve(vllm_env: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with vllm_server(tiny_model, VLLM_FLAGS, tmp_path_factory.mktemp("vllm-serve")) as base:
        yield base


@pytest.fixture(scope="module")
def relay(vllm_serve: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with relay_stack(tiny_model, OPTIONS, tmp_path_factory.mktemp("relay-stack")) as stack:
        yield stack.base_url


@pytest.mark.parametrize("name,endpoint,body", cases(), ids=[c[0] for c in cases()])
def test_same_answer(vllm_serve: str, relay: str, name: str, endpoint: str, body: dict[str, Any]) -> None:
    expected = answer(vllm_serve, endpoint, body)
    got = answer(relay, endpoint, body)
    print("\n%-48s %d %s" % (name, got["status"], summary(got)))  # the conformance table, with -s
    assert diff(expected, got) is None, "%s: %s\nvllm: %s\ntokenrelay: %s" % (
        name, diff(expected, got), json.dumps(expected)[:2000], json.dumps(got)[:2000])


def test_unknown_model_is_404_on_both(vllm_serve: str, relay: str) -> None:
    """A model the proxy does not route goes to the only deployment, whose vLLM says so as `vllm serve`
    does (type NotFoundError, its message); it was the proxy's own 404 (code model_not_found)."""
    name, endpoint, body = UNKNOWN_MODEL
    expected, got = answer(vllm_serve, endpoint, body), answer(relay, endpoint, body)
    assert expected["status"] == got["status"] == 404
    assert expected["body"]["error"]["param"] == got["body"]["error"]["param"] == "model"
    assert diff(expected, got) is None, diff(expected, got)


@pytest.mark.parametrize("name,endpoint,raw,headers", RAW, ids=[c[0] for c in RAW])
def test_same_answer_to_raw_bodies(vllm_serve: str, relay: str, name: str, endpoint: str, raw: bytes,
                                   headers: dict[str, str]) -> None:
    """Bodies that are not plain JSON objects, or not sent as JSON: the same status, error type, param and
    message (vLLM's app judges them on both), or the same answer where vLLM takes them."""
    expected, got = (seen(httpx.post(base + endpoint, content=raw, headers=headers, timeout=120))
                     for base in (vllm_serve, relay))
    print("\n%-48s %d %s" % (name, got["status"], summary(got)))
    assert diff(expected, got) is None, "%s: %s\nvllm: %s\ntokenrelay: %s" % (
        name, diff(expected, got), json.dumps(expected)[:2000], json.dumps(got)[:2000])


def test_a_stored_response_that_is_not_there_is_the_same_404(vllm_serve: str, relay: str) -> None:
    """GET /v1/responses/{id} and its cancel: vllm serve (store off, its default) and tokenrelay (no store)
    give the same status, type, param and message for an id they do not hold."""
    for method, path in (("GET", "/v1/responses/resp_nothere"), ("POST", "/v1/responses/resp_nothere/cancel")):
        expected, got = (httpx.request(method, base + path, timeout=30) for base in (vllm_serve, relay))
        assert expected.status_code == got.status_code == 404, (path, expected.text, got.text)
        e, g = expected.json()["error"], got.json()["error"]
        assert (e["type"], e["param"], e["message"]) == (g["type"], g["param"], g["message"]), (e, g)


def test_no_model_means_the_only_one(vllm_serve: str, relay: str) -> None:
    body = {"messages": USER, "max_tokens": 3, **GREEDY}
    expected, got = answer(vllm_serve, CHAT, body), answer(relay, CHAT, body)
    assert expected["status"] == 200 and diff(expected, got) is None, diff(expected, got)


def test_the_model_list_is_the_same(vllm_serve: str, relay: str) -> None:
    """GET /v1/models: vLLM's own entry (max_model_len, root, permission), which applications read the
    context length from; the same through the official client."""
    def listing(base: str) -> Any:
        return normalize(httpx.get(base + "/v1/models", timeout=30).json())

    expected, got = listing(vllm_serve), listing(relay)
    assert expected["data"][0]["max_model_len"] == 512, expected
    assert diff(expected, got) is None, diff(expected, got)
    openai = pytest.importorskip("openai")
    ids = [[m.id for m in openai.OpenAI(base_url=base + "/v1", api_key="unused").models.list()]
           for base in (vllm_serve, relay)]
    assert ids[0] == ids[1] == [MODEL]


def test_the_official_client_gets_the_same(vllm_serve: str, relay: str) -> None:
    """The same calls through the `openai` client, whose parsed objects must match."""
    openai = pytest.importorskip("openai")

    def calls(base: str) -> list[Any]:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        named = {"type": "function", "function": {"name": "get_weather"}}
        return [normalize(reply.model_dump()) for reply in (
            client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=named,
                                           max_tokens=24, temperature=0),
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "a", "schema": SCHEMA}}),
            client.completions.create(model=MODEL, prompt="The weather", max_tokens=3, echo=True, logprobs=2,
                                      temperature=0),
            client.responses.create(model=MODEL, input="The weather in Paris", max_output_tokens=6,
                                    temperature=0),
        )]

    expected, got = calls(vllm_serve), calls(relay)
    assert expected[0]["choices"][0]["message"]["tool_calls"], expected[0]
    assert diff(expected, got) is None, diff(expected, got)



def test_the_answer_is_named_as_vllm_serve_names_it(vllm_serve: str, relay: str) -> None:
    """An answer's id, which the comparison above leaves out, when the client names it: `X-Request-ID`,
    else the body's `request_id` (tokenrelay named every answer after its own request id)."""
    body = {"model": MODEL, "prompt": "a", "max_tokens": 2, **GREEDY}
    for extra, headers, stream in (({}, {"X-Request-ID": "client-id"}, False),
                                   ({"request_id": "body-id"}, {}, False), ({"request_id": "body-id"}, {}, True),
                                   ({"request_id": "body-id"}, {"X-Request-ID": "client-id"}, False)):
        ids = []
        for base in (vllm_serve, relay):
            r = httpx.post(base + COMPLETIONS, json={**body, **extra, "stream": stream}, headers=headers, timeout=60)
            first = r.text.split("\n\n")[0].removeprefix("data: ") if stream else r.text
            ids.append(json.loads(first)["id"])
        assert ids[0] == ids[1] and ids[0].endswith(headers.get("X-Request-ID", "body-id")), (extra, headers, ids)
