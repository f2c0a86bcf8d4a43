"""model_proc.relay_resume: which relayed requests may resume, how the engine request continues, and
how a resumed replica's SSE events are made to continue the client's stream. No vLLM, no sockets."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from model_proc.relay_resume import continue_events, continued, refusal, reportable
from model_proc.vllm_serving import Relayed, record_output
from runtime.protocol import Resume

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"


class Sampling(SimpleNamespace):
    def clone(self) -> "Sampling":
        return Sampling(**vars(self))


def sampling(**fields: Any) -> Sampling:
    base = dict(n=1, structured_outputs=None, stop=[], include_stop_str_in_output=False, max_tokens=40,
                min_tokens=0)
    return Sampling(**dict(base, **fields))


def test_plain_streams_of_chat_and_completions_are_resumable() -> None:
    assert refusal(CHAT, {"messages": [], "stream": True, "temperature": 0, "max_tokens": 9}, False) is None
    assert refusal("/v1/completions", {"prompt": "x", "stream": True, "n": 1}, False) is None
    assert refusal("/v1/completions", {"prompt": [1, 2, 3], "stream": True}, False) is None


@pytest.mark.parametrize("endpoint,body,reasoning,why", [
    ("/v1/responses", {"input": "x", "stream": True}, False, "/v1/responses"),
    (CHAT, {"messages": []}, False, "only streamed"),
    (CHAT, {"stream": True, "n": 2}, False, "n > 1"),
    (CHAT, {"stream": True, "tools": [{"type": "function"}]}, False, "tools"),
    (CHAT, {"stream": True, "response_format": {"type": "json_object"}}, False, "response_format"),
    (CHAT, {"stream": True, "stop": ["\n"]}, False, "stop"),
    (CHAT, {"stream": True}, True, "reasoning parser"),
    ("/v1/completions", {"stream": True, "echo": True}, False, "echo"),
    ("/v1/completions", {"stream": True, "prompt": ["a", "b"]}, False, "several prompts"),
])
def test_what_cannot_be_continued_is_refused_with_the_reason(endpoint: str, body: dict, reasoning: bool,
                                                             why: str) -> None:
    assert why in (refusal(endpoint, body, reasoning) or "")


def test_the_engine_request_continues_after_the_resumed_ids() -> None:
    prompt = {"type": "token", "prompt_token_ids": [1, 2, 3], "prompt": "abc", "cache_salt": "s"}
    s = sampling(max_tokens=10, min_tokens=5)
    new_prompt, new_s = continued(prompt, s, [7, 8, 9])
    assert new_prompt == {"type": "token", "prompt_token_ids": [1, 2, 3, 7, 8, 9], "cache_salt": "s"}
    assert (new_s.max_tokens, new_s.min_tokens) == (7, 2) and (s.max_tokens, s.min_tokens) == (10, 5)


@pytest.mark.parametrize("prompt,fields", [
    ({"type": "multimodal", "prompt_token_ids": [1]}, {}),
    ({"type": "token", "prompt_token_ids": [1]}, {"n": 2}),
    ({"type": "token", "prompt_token_ids": [1]}, {"structured_outputs": object()}),
    ({"type": "token", "prompt_token_ids": [1]}, {"stop": ["x"]}),
    ({"type": "token", "prompt_token_ids": [1]}, {"max_tokens": 3}),  # all 3 were sent: nothing left
])
def test_an_engine_request_that_cannot_continue_raises(prompt: dict, fields: dict) -> None:
    with pytest.raises(ValueError):
        continued(prompt, sampling(**fields), [7, 8, 9])


def test_ids_are_reported_only_when_every_outputs_text_goes_out_with_it() -> None:
    assert reportable(sampling())
    assert not reportable(sampling(stop=["\n"]))  # text held back for the stop string
    assert reportable(sampling(stop=["\n"], include_stop_str_in_output=True))
    assert not reportable(sampling(n=2))


def chunk(delta: dict, created: int = 99, finish: Any = None) -> str:
    return "data: " + json.dumps({"id": "chatcmpl-r", "created": created, "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


def test_resumed_events_continue_the_clients_stream() -> None:
    role = chunk({"role": "assistant", "content": ""})
    text = chunk({"content": "lo"})
    usage = 'data: {"id":"chatcmpl-r","created":99,"choices":[],"usage":{"prompt_tokens":13,' \
            '"completion_tokens":4,"total_tokens":17}}\n\n'
    out = continue_events(role + text + usage + "data: [DONE]\n\n", resumed=3, created=42)
    events = out.split("\n\n")[:-1]
    assert len(events) == 3 and events[-1] == "data: [DONE]"  # no second role chunk
    first, last = json.loads(events[0][6:]), json.loads(events[1][6:])
    assert first["created"] == 42 and first["id"] == "chatcmpl-r" and first["choices"][0]["delta"] == {"content": "lo"}
    assert last["usage"] == {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}


def step(prompt: Any, ids: list[int], text: str) -> SimpleNamespace:
    return SimpleNamespace(prompt_token_ids=prompt, outputs=[SimpleNamespace(token_ids=ids, text=text)])


def test_a_resumed_request_counts_and_reports_ids_once() -> None:
    rec = Relayed("r", report_ids=True, resume=Resume([5, 6, 7], 42))
    for out in (step([1, 2, 5, 6, 7], [8], "a"),):
        record_output(rec, "a", out, delta=True)
        rec.note_text(out)
    assert (rec.prompt_total, rec.completion_total) == (2, 4)  # as the client counts them
    assert rec.unreported_ids() == [8] and rec.unreported_ids() == []
    assert rec.completion_reported(final=False) == 4
    assert Relayed("s").unreported_ids() == []  # not resumable: no ids


def test_ids_whose_text_is_held_back_are_reported_with_it() -> None:
    """vLLM's detokenizer holds back a character split over tokens: its ids go out with its text, and
    the running count says only what was reported, so a resume never skips held-back text."""
    rec = Relayed("r", report_ids=True)
    outs = [step([1], [10], "a"), step(None, [11], ""), step(None, [12], "\u00e9")]
    record_output(rec, "a", outs[0], delta=True)
    rec.note_text(outs[0])
    assert rec.unreported_ids() == [10]
    record_output(rec, "a", outs[1], delta=True)
    rec.note_text(outs[1])
    assert rec.unreported_ids() == [] and rec.completion_reported(final=False) == 1
    assert rec.completion_reported(final=True) == 2
    record_output(rec, "a", outs[2], delta=True)
    rec.note_text(outs[2])
    assert rec.unreported_ids() == [11, 12] and rec.completion_reported(final=False) == 3


def test_after_a_replacement_character_no_ids_are_reported() -> None:
    rec = Relayed("r", report_ids=True)
    out = step([1], [10, 11], "a\ufffd")
    record_output(rec, "a", out, delta=True)
    rec.note_text(out)
    assert rec.unreported_ids() == [] and rec.completion_reported(final=False) == 2
