"""OpenAI API parity with `vllm serve` on a reasoning deployment (`reasoning_parser: deepseek_r1`).

The tiny reasoning model (tests/tiny_model.py, `build_tiny_reasoning_model`: `<think>` and `</think>` are
tokens of its own, its chat template opens a thought) is served once for the module by `vllm serve` and
by a tokenrelay stack with one vLLM replica, both with the same options; every row of TABLE goes to both,
streamed and not, and the answers must match field by field (test_conformance.py's helpers: status,
error type and param, content, reasoning, finish reasons, usage with its reasoning token count; ids and
timestamps left out). Random weights think forever, so the rows that need the thought to end force
`</think>` with `logit_bias` (greedy), or close it in the prompt (`chat_template_kwargs`).

Also here: a relayed chat stream on a reasoning deployment is not resumable (model_proc/relay_resume.py,
`refusal`): when its replica dies mid-way the client gets an SSE error event and `data: [DONE]`, and the
proxy does not try to resume it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.vllm.harness import skip_without_vllm

skip_without_vllm()

import httpx  # noqa: E402

from tests.integration.stack import Stack  # noqa: E402
from tests.vllm.test_conformance import cases as conformance_cases  # noqa: E402
from tests.vllm.test_conformance import (  # noqa: E402
    CHAT, COMPLETIONS, GREEDY, MODEL, RESPONSES, USER, answer, diff, normalize, relay_stack, summary,
    vllm_server)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(400)]

PARSER = "deepseek_r1"
OPTIONS = {"max_model_len": 2048, "reasoning_parser": PARSER}
VLLM_FLAGS = ["--served-model-name", MODEL, "--max-model-len", "2048", "--reasoning-parser", PARSER,
              "--dtype", "bfloat16", "--enforce-eager"]
END = "</think>"  # in a logit_bias, replaced by the token's id (`with_ids`)
# vLLM forces `</think>` once the budget is spent, even past allowed_token_ids; these ids (plain BPE tokens
# of the tiny vocabulary) keep the model from repeating `</think>` after it, as its random weights would
WORDS = list(range(300, 400))

# (name, endpoint, body, streams): as in test_conformance.TABLE; chat and completion streams with usage
TABLE: list[tuple[str, str, dict[str, Any], bool]] = [
    ("chat thinks", CHAT, {"messages": USER, "max_tokens": 6, **GREEDY}, True),
    ("chat thinking_token_budget ends the thought", CHAT, {"messages": USER, "max_tokens": 6, **GREEDY,
                                                           "thinking_token_budget": 3, "allowed_token_ids": WORDS},
     True),
    ("chat logit_bias forces </think>", CHAT, {"messages": USER, "max_tokens": 3, "logit_bias": {END: 100},
                                               **GREEDY}, True),
    ("chat thinking closed in the prompt", CHAT, {"messages": USER, "max_tokens": 5, **GREEDY,
                                                  "chat_template_kwargs": {"enable_thinking": False}}, True),
    ("chat reasoning_effort none", CHAT, {"messages": USER, "max_tokens": 4, "reasoning_effort": "none",
                                          **GREEDY}, True),
    ("chat include_reasoning false", CHAT, {"messages": USER, "max_tokens": 4, "include_reasoning": False,
                                            **GREEDY}, True),
    ("chat bad reasoning_effort", CHAT, {"messages": USER, "max_tokens": 4, "reasoning_effort": "extreme"},
     False),
    ("chat bad thinking_token_budget", CHAT, {"messages": USER, "max_tokens": 4, "thinking_token_budget": "x"},
     False),
    ("completion not parsed", COMPLETIONS, {"prompt": "The weather", "max_tokens": 4, **GREEDY}, True),
    ("responses reasoning item", RESPONSES, {"input": "The weather in Paris", "max_output_tokens": 6,
                                             **GREEDY}, True),
]


def cases() -> list[tuple[str, str, dict[str, Any]]]:
    """TABLE as test_conformance expands it; streamed chat and completion rows ask for usage too."""
    return conformance_cases(TABLE, lambda endpoint: {} if endpoint == RESPONSES else {
        "stream_options": {"include_usage": True}})


def with_ids(body: dict[str, Any], end_id: int) -> dict[str, Any]:
    if END in body.get("logit_bias", {}):
        body = {**body, "logit_bias": {str(end_id): body["logit_bias"][END]}}
    return body


@pytest.fixture(scope="module")
def reasoning_model(vllm_env: Path) -> Path:
    from tests.tiny_model import build_tiny_reasoning_model

    return build_tiny_reasoning_model(vllm_env / "tiny-reasoning")


@pytest.fixture(scope="module")
def end_id(reasoning_model: Path) -> int:
    from tests.tiny_model import think_token_ids

    return think_token_ids(reasoning_model)[1]


@pytest.fixture(scope="module")
def vllm_serve(reasoning_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with vllm_server(reasoning_model, VLLM_FLAGS, tmp_path_factory.mktemp("vllm-serve-reasoning")) as base:
        yield base


@pytest.fixture(scope="module")
def stack(vllm_serve: str, reasoning_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with relay_stack(reasoning_model, OPTIONS, tmp_path_factory.mktemp("relay-reasoning")) as s:
        yield s


def settled(got: dict[str, Any]) -> dict[str, Any]:
    """A stream's reasoning that adds up to "" is left out: whether vLLM's parser sends an empty one
    depends on how tokens were chunked (`</think>` alone in a delta is skipped; with the tokens after it,
    it gives reasoning "" and the content), which is timing, on `vllm serve` as much as here."""
    for choice in got.get("stream", {}).get("choices", {}).values():
        if (choice.get("delta") or {}).get("reasoning") == "":
            del choice["delta"]["reasoning"]
    return got


@pytest.mark.parametrize("name,endpoint,body", cases(), ids=[c[0] for c in cases()])
def test_same_answer(vllm_serve: str, stack: Stack, end_id: int, name: str, endpoint: str,
                     body: dict[str, Any]) -> None:
    body = with_ids(body, end_id)
    expected = settled(answer(vllm_serve, endpoint, body))
    got = settled(answer(stack.base_url, endpoint, body))
    print("\n%-48s %d %s%s" % (name, got["status"], summary(got), split(got)))  # the table, with -s
    assert diff(expected, got) is None, "%s: %s\nvllm: %s\ntokenrelay: %s" % (
        name, diff(expected, got), json.dumps(expected)[:2000], json.dumps(got)[:2000])


def message(got: dict[str, Any]) -> dict[str, Any]:
    """The first choice's message, or what a stream's deltas add up to."""
    if "body" in got:
        return got["body"]["choices"][0]["message"]
    return got["stream"]["choices"][0]["delta"]


def split(got: dict[str, Any]) -> str:
    """What went to reasoning and what to content, or the Responses API's output items (for the table)."""
    body = got.get("body") or got.get("stream") or {}
    if got["status"] != 200:
        return ""
    choices = body.get("choices")
    if choices:
        first = choices[0] if isinstance(choices, list) else choices.get(0, {})
        msg = first.get("message") or first.get("delta")
        return ", reasoning %r, content %r" % (msg.get("reasoning"), msg.get("content")) if msg else ""
    response = body.get("final", {}).get("response", body)
    return ", output items %s" % [item.get("type") for item in response.get("output") or []]


def test_the_rows_split_reasoning_from_content(vllm_serve: str, end_id: int) -> None:
    """The table exercises the parser (checked on `vllm serve`'s answers; tokenrelay's equal them): a thought
    is reasoning; once `</think>` comes (a spent thinking_token_budget) the rest is content; a thought
    closed in the prompt makes all of it content (in a stream: vLLM's non-streamed parser looks at the
    output alone and calls it reasoning); /v1/responses gives a reasoning item."""
    rows = {name: {"model": MODEL, **body} for name, _, body, _ in TABLE}
    for stream in (False, True):
        thinks = message(answer(vllm_serve, CHAT, {**rows["chat thinks"], "stream": stream}))
        assert thinks["reasoning"] and not thinks["content"], thinks
        ended = message(answer(vllm_serve, CHAT, {**rows["chat thinking_token_budget ends the thought"],
                                                  "stream": stream}))
        assert ended["reasoning"] and ended["content"] and END not in ended["content"], ended
    closed = message(answer(vllm_serve, CHAT, {**rows["chat thinking closed in the prompt"], "stream": True}))
    assert closed["content"] and not closed.get("reasoning"), closed
    response = answer(vllm_serve, RESPONSES, {"model": MODEL, **rows["responses reasoning item"]})["body"]
    assert response["output"][0]["type"] == "reasoning", response["output"]


def test_the_official_client_gets_the_same(vllm_serve: str, stack: Stack) -> None:
    """The `openai` client's parsed objects match: the message's `reasoning` (an extra field to it) and
    content, and the Responses API's reasoning item."""
    openai = pytest.importorskip("openai")

    def calls(base: str) -> list[Any]:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        return [normalize(reply.model_dump()) for reply in (
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0,
                                           extra_body={"thinking_token_budget": 3, "allowed_token_ids": WORDS}),
            client.responses.create(model=MODEL, input="The weather in Paris", max_output_tokens=6,
                                    temperature=0),
        )]

    expected, got = calls(vllm_serve), calls(stack.base_url)
    message = expected[0]["choices"][0]["message"]
    assert message["reasoning"] and message["content"], message
    assert expected[1]["output"][0]["type"] == "reasoning", expected[1]["output"]
    assert diff(expected, got) is None, diff(expected, got)


@pytest.fixture(scope="module")
def words(reasoning_model: Path) -> list[int]:
    """Token ids that are a lower-case word: whole UTF-8, so only the reasoning parser stands in the way
    of a resume (a stream with U+FFFD in it is not resumed either)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reasoning_model))
    return [i for i in range(len(tok)) if re.fullmatch(r" ?[a-z]{2,}", tok.decode([i]))]


def proxy_resumes(stack: Stack) -> float:
    text = httpx.get(stack.base_url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tokenrelay_proxy_resumes_total"))


def test_a_reasoning_stream_whose_replica_dies_ends_with_an_error_not_a_resume(
        stack: Stack, words: list[int]) -> None:
    """Last in the module: it kills the stack's only replica (the stack stops while its agent restarts it)."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "allowed_token_ids": words, **GREEDY}
    before = proxy_resumes(stack)
    got: list[str] = []
    with httpx.stream("POST", stack.base_url + CHAT, json=body, timeout=60) as r:
        assert r.status_code == 200
        parts = r.iter_text()
        while "".join(got).count('"reasoning"') < 8:
            got.append(next(parts))  # a few reasoning tokens in
        (replica,) = stack.replicas(MODEL)
        os.kill(replica["pid"], signal.SIGKILL)
        killed = time.monotonic()
        got.extend(parts)
        ended = time.monotonic() - killed
    events = [block[len("data: "):] for block in "".join(got).split("\n\n") if block.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, events[-3:]
    last = json.loads(events[-2])
    assert "error" in last, "the stream ran to its end: the kill came too late (%s)" % events[-2][:300]
    finishes = [c["finish_reason"] for e in events[:-2] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert not finishes, finishes
    assert proxy_resumes(stack) == before, "the proxy resumed a stream the replica said it cannot continue"
    print("\nstream of %d chunks ended %.2f s after the kill: %s" % (len(events), ended, events[-2][:200]))
