"""Unit tests for proxy.openai_request: mapping OpenAI bodies to GenerateRequest, and every 400."""
from __future__ import annotations

import json
from typing import Any, Optional

import pytest

from proxy.errors import InvalidRequest
from proxy.openai_request import CHAT, COMPLETION, parse_chat, parse_completion, parse_plain, plain_max_tokens
from runtime.protocol import ChatMessage, SamplingParams

MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    body = {"model": "tiny", "messages": MSGS}
    body.update(fields)
    return json.dumps(body).encode()


def completion(**fields: Any) -> bytes:
    body = {"model": "tiny", "prompt": "once upon"}
    body.update(fields)
    return json.dumps(body).encode()


def test_chat_minimal() -> None:
    p = parse_chat(chat())
    assert (p.kind, p.model, p.stream, p.include_usage) == (CHAT, "tiny", False, False)
    req = p.to_generate("w1-a-1")
    assert req.request_id == "w1-a-1" and req.prompt is None
    assert req.messages == [ChatMessage("user", "hi")]
    assert req.params == SamplingParams()


def test_chat_all_params_mapped_and_null_unknown_fields_absent() -> None:
    p = parse_chat(chat(stream=True, stream_options={"include_usage": True}, max_tokens=7, temperature=0.5,
                        top_p=0.9, top_k=40, stop="END", seed=3, presence_penalty=0.1, frequency_penalty=-0.2,
                        n=1, user="bob", logit_bias=None, tools=None,
                        messages=[{"role": "user", "content": "hi", "name": None}]))
    assert p.stream and p.include_usage
    assert p.params == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, stop=["END"], seed=3,
                                      presence_penalty=0.1, frequency_penalty=-0.2)
    assert p.messages == (ChatMessage("user", "hi"),)


@pytest.mark.parametrize("body,param", [
    (chat(tools=[]), "tools"),
    (chat(logit_bias={"1": 2}), "logit_bias"),
    (chat(messages=[{"role": "user", "content": "hi", "name": "bob"}]), "messages[0].name"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a", "cache": 1}]}]),
     "messages[0].content[0].cache"),
    (chat(stream_options={"include_usage": True, "continuous_usage_stats": True}),
     "stream_options.continuous_usage_stats"),
    (completion(suffix="x"), "suffix"),
])
def test_fields_the_engine_does_not_take_are_refused_naming_them(body: bytes, param: str) -> None:
    parse = parse_completion if b'"prompt"' in body else parse_chat
    with pytest.raises(InvalidRequest) as info:
        parse(body, "mock")
    assert info.value.status == 400 and info.value.param == param
    assert info.value.message == ("'%s' is not supported by this deployment's engine (mock); see docs/api.md"
                                  % param)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse_chat(chat(max_tokens=100, max_completion_tokens=5)).params.max_tokens == 5
    assert parse_chat(chat(max_tokens=100)).params.max_tokens == 100


def test_nulls_mean_absent() -> None:
    p = parse_chat(chat(temperature=None, stop=None, max_tokens=None, stream=None, stream_options=None, n=None))
    assert p.params == SamplingParams() and not p.stream


def test_content_parts_joined_and_null_content_allowed() -> None:
    msgs = [{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}, {"role": "user", "content": "q"}]
    p = parse_chat(chat(messages=msgs))
    assert p.messages == (ChatMessage("system", "a\nb"), ChatMessage("assistant", ""), ChatMessage("user", "q"))


def test_stop_list_and_integral_float_accepted() -> None:
    p = parse_completion(completion(stop=["a", "b"], max_tokens=16.0))
    assert p.kind == COMPLETION and p.params.stop == ["a", "b"] and p.params.max_tokens == 16
    assert p.to_generate("r").prompt == "once upon" and p.to_generate("r").messages is None


@pytest.mark.parametrize("parse, make", [(parse_chat, chat), (parse_completion, completion)])
def test_what_vllm_refuses_across_fields_the_mock_refuses_too(parse: Any, make: Any) -> None:
    """Both were accepted and silently ignored on a mock deployment; `vllm serve` answers 400."""
    for fields in ({"stream_options": {"include_usage": True}}, {"stream": False,
                                                                   "stream_options": {"include_usage": False}}):
        with pytest.raises(InvalidRequest) as info:
            parse(make(**fields))
        assert info.value.param == "stream_options"
        assert info.value.message == "Stream options can only be defined when `stream=True`."
    assert not parse(make(stream_options={})).include_usage  # an empty object: vLLM takes it too
    for stop in ("", ["END", ""]):
        with pytest.raises(InvalidRequest) as info:
            parse(make(stop=stop))
        assert (info.value.param, info.value.message) == ("stop", "stop cannot contain an empty string.")


@pytest.mark.parametrize("body,param,needle", [
    (b"{not json", None, "not valid JSON"),
    (b"", None, "empty"),
    (b"[1, 2]", None, "JSON object"),
    (b'"text"', None, "JSON object"),
    (json.dumps({"messages": MSGS}).encode(), "model", "required"),
    (chat(model=5), "model", "string"),
    (chat(model=""), "model", "length >= 1"),
    (json.dumps({"model": "tiny"}).encode(), "messages", "required"),
    (chat(messages=[]), "messages", "length >= 1"),
    (chat(messages="hi"), "messages", "expected `array`, got `string`"),
    (chat(messages=["hi"]), "messages[0]", "object"),
    (chat(messages=[{"content": "x"}]), "messages[0].role", "role"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "`string | array | null`"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0].type", "'image_url'"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text", "required"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
     "messages[0].content[0].text", "string"),
    (chat(stream="yes"), "stream", "boolean"),
    (chat(stream_options=[]), "stream_options", "object"),
    (chat(stream_options={"include_usage": "y"}), "stream_options.include_usage", "boolean"),
    (chat(max_tokens="10"), "max_tokens", "integer"),
    (chat(max_tokens=0), "max_tokens", ">= 1"),
    (chat(max_tokens=True), "max_tokens", "integer"),
    (chat(max_tokens=1.5), "max_tokens", "integer"),
    (chat(max_completion_tokens=-1), "max_completion_tokens", ">= 1"),
    (chat(temperature="hot"), "temperature", "number"),
    (chat(temperature=-0.1), "temperature", ">= 0.0"),
    (chat()[:-1] + b', "temperature": 1e999}', "temperature", "out of range"),  # not a finite float
    (chat(temperature=10**400), "temperature", "out of range"),
    (chat(top_p=0), "top_p", "> 0.0"),
    (chat(top_p=1.5), "top_p", "<= 1.0"),
    (chat(top_k=-2), "top_k", ">= -1"),
    (chat(seed="1"), "seed", "integer"),
    (chat(presence_penalty=3), "presence_penalty", "<= 2.0"),
    (chat(seed=2**63), "seed", "<= 9223372036854775807"),
    (chat(seed=-(2**63) - 1), "seed", ">= -9223372036854775808"),
    (chat(max_tokens=2**31), "max_tokens", "<= 2147483647"),
    (chat(max_tokens=16.0, tools=[]), "tools", "not supported"),
    (chat(frequency_penalty="x"), "frequency_penalty", "number"),
    (chat(stop=5), "stop", "`string | array | null`"),
    (chat(stop=["a", 1]), "stop[1]", "string"),
    (chat(n=2), "n", "<= 1"),
    (chat(n="1"), "n", "integer"),
])
def test_chat_validation_errors(body: bytes, param: Optional[str], needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat(body)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param == param
    assert needle in err.message
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error", "param": param,
                                    "code": None}}


@pytest.mark.parametrize("body,param", [
    (json.dumps({"model": "tiny"}).encode(), "prompt"),
    (completion(prompt=["a", "b"]), "prompt"),
    (completion(prompt=[1, 2, 3]), "prompt"),
    (completion(model=None), "model"),
    (completion(temperature=[]), "temperature"),
])
def test_completion_validation_errors(body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_completion(body)
    assert info.value.status == 400 and info.value.param == param


def test_plain_query_takes_max_tokens_once_and_nothing_else() -> None:
    """`?max_token=3` (a typo) and `?foo=1` were ignored: the answer ran to the engine's default length."""
    assert plain_max_tokens({}) is None
    assert plain_max_tokens({"max_tokens": "3"}) == "3"
    for query, param, needle in (({"max_token": "3"}, "max_token", "unknown query parameter 'max_token'"),
                                 ({"max_tokens": "3", "x" * 5000: "1"}, "x" * 100, "takes only ?max_tokens=N"),
                                 ({"max_tokens": ["1", "5"]}, "max_tokens", "more than once")):
        with pytest.raises(InvalidRequest) as info:
            plain_max_tokens(query)
        assert info.value.param == param and needle in info.value.message


def test_plain_body() -> None:
    assert parse_plain("héllo".encode(), None) == ("héllo", SamplingParams())
    assert parse_plain(b"x", "12") == ("x", SamplingParams(max_tokens=12))


@pytest.mark.parametrize("body,max_tokens,param", [
    (b"", None, "body"),
    (b"\xff\xfe", None, "body"),
    (b"x", "ten", "max_tokens"),
    (b"x", "0", "max_tokens"),
])
def test_plain_errors(body: bytes, max_tokens: Optional[str], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_plain(body, max_tokens)
    assert info.value.status == 400 and info.value.param == param
