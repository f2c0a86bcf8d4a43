"""Relayed vLLM requests survive their replica's death: two tiny-model replicas behind the whole stack
(`python -m runtime up`), one SIGKILLed while it serves a greedy request; the client's response must be
the one an uninterrupted run gives (docs/api.md, "Replica failure mid-stream").

One stack for the module. The tiny model runs in float32 so a continuation computed from a prefill of
the sent tokens picks the same greedy tokens as the uninterrupted decode. Its random weights left alone
emit byte tokens that never form valid UTF-8 (vLLM then sends U+FFFD, and such a stream is not resumed:
model_proc/vllm_serving.py); `allowed_token_ids` keeps it to whole ASCII words, as real text is.
"""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.vllm.harness import skip_without_vllm

skip_without_vllm()

import httpx  # noqa: E402
import psutil  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.integration.stack import Stack, wait_for  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(400)]

MAX_TOKENS = 1800  # ignore_eos: ~3 s here (the tiny model makes ~600 tokens/s), so the kill lands mid-way
MESSAGES = [{"role": "user", "content": "Tell me a long story about the sea."}]


@pytest.fixture(scope="module")
def stack(vllm_env: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tiny = {"name": "tiny", "engine": "vllm", "model": str(tiny_model), "replicas": 2,
            "engine_args": {"max_model_len": 2048, "dtype": "float32"}}
    s = Stack(tmp_path_factory.mktemp("vllm-resume"), [tiny], workers=1)
    started = time.monotonic()
    try:
        s.start(timeout=240)
        print("\nstack with two tiny replicas ready in %.1f s" % (time.monotonic() - started))
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def words(tiny_model: Path) -> list[int]:
    """Ids of the tiny tokenizer's tokens that are a lower-case word, with or without a leading space."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ids = [i for i in range(len(tok)) if re.fullmatch(r" ?[a-z]{2,}", tok.decode([i]))]
    assert len(ids) > 50
    return ids


def body(stream: bool, words: list[int], chat: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "tiny", "temperature": 0, "max_tokens": MAX_TOKENS,
                           "ignore_eos": True, "stream": stream, "allowed_token_ids": words}
    if chat:
        out["messages"] = MESSAGES
    else:
        out["prompt"] = "Once upon a time"
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def events(text: str) -> list[Any]:
    """The SSE events of a body: parsed JSON chunks, and "[DONE]"."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            out.append("[DONE]" if block == "data: [DONE]" else json.loads(block[6:]))
        else:
            assert not block.strip(), "not an SSE event: %r" % block
    return out


def content(chunks: list[Any]) -> str:
    """The text of chat chunks (delta.content) or completion chunks (text)."""
    return "".join((c["choices"][0]["delta"].get("content") or "") if "delta" in c["choices"][0]
                   else c["choices"][0].get("text") or "" for c in chunks if isinstance(c, dict) and c.get("choices"))


def seam(got: str, want: str) -> str:
    """Where two texts part (for a failure message)."""
    at = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), min(len(got), len(want)))
    return "lengths %d vs %d, first difference at %d: %r vs %r" % (
        len(got), len(want), at, got[max(0, at - 40):at + 40], want[max(0, at - 40):at + 40])


def resumes(stack: Stack) -> float:
    text = httpx.get(stack.base_url + "/metrics", timeout=5).text
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "tokenrelay_proxy_resumes"
               for s in fam.samples if s.name.endswith("_total"))


def proxy_metric(stack: Stack, sample: str) -> float:
    text = httpx.get(stack.base_url + "/metrics", timeout=5).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == sample)


def busy_replica(stack: Stack) -> dict | None:
    """The replica generating right now: the one whose process tree burned over 30% of a core in the
    last 0.3 s, and 3 times what the other did (None: neither, or no clear one)."""
    replicas = stack.replicas("tiny")

    def cpu(pid: int) -> float:
        root = psutil.Process(pid)
        total = 0.0
        for p in [root] + root.children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    before = [cpu(r["pid"]) for r in replicas]
    time.sleep(0.3)
    used = [cpu(r["pid"]) - b for r, b in zip(replicas, before, strict=True)]
    top = max(range(len(used)), key=used.__getitem__)
    others = [u for i, u in enumerate(used) if i != top]
    return replicas[top] if used[top] > 0.09 and all(used[top] > 3 * u for u in others) else None


def ready_again(stack: Stack) -> None:
    wait_for(stack.all_ready, 120, "both replicas ready again")


@pytest.fixture(scope="module")
def uninterrupted(stack: Stack, words: list[int]) -> dict[str, Any]:
    started = time.monotonic()
    whole = httpx.post(stack.base_url + "/v1/chat/completions", json=body(False, words), timeout=120)
    took = time.monotonic() - started
    streamed = httpx.post(stack.base_url + "/v1/chat/completions", json=body(True, words), timeout=120)
    completion = httpx.post(stack.base_url + "/v1/completions", json=body(True, words, chat=False), timeout=120)
    assert whole.status_code == 200 and streamed.status_code == 200 and completion.status_code == 200
    print("\nuninterrupted: %d tokens in %.2f s" % (whole.json()["usage"]["completion_tokens"], took))
    return {"whole": whole.json(), "stream": events(streamed.text), "completion": events(completion.text)}


def test_a_stream_whose_replica_is_killed_goes_on_without_a_seam(stack: Stack, uninterrupted: dict,
        words: list[int]) -> None:
    before = resumes(stack)
    got: list[str] = []
    with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=body(True, words), timeout=120) as r:
        assert r.status_code == 200
        parts = r.iter_text()
        while "".join(got).count("data: ") < 8:
            got.append(next(parts))  # a few tokens in
        victim = wait_for(lambda: busy_replica(stack), 2, "the replica serving the stream")
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = len("".join(got))
        got.extend(parts)
    text = "".join(got)
    chunks = events(text)
    want = uninterrupted["stream"]
    assert not any(isinstance(c, dict) and "error" in c for c in chunks), text[-500:]
    assert resumes(stack) == before + 1, "the kill did not land mid-stream (%d bytes in)" % killed_at
    assert content(chunks) == content(want), seam(content(chunks), content(want))  # none repeated or missing
    assert chunks[-1] == "[DONE]" and chunks.count("[DONE]") == 1
    data = [c for c in chunks if isinstance(c, dict)]
    assert len({c["id"] for c in data}) == 1 and len({c["created"] for c in data}) == 1
    roles = [c for c in data if c["choices"] and "role" in c["choices"][0]["delta"]]
    finishes = [c["choices"][0]["finish_reason"] for c in data if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(roles) == 1 and finishes == ["length"]
    assert data[-1]["usage"] == [c for c in want if isinstance(c, dict)][-1]["usage"]  # each token once
    assert data[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    print("\nresumed after %d replayed tokens; pause seen by the client %.3f s" % (
        proxy_metric(stack, "tokenrelay_proxy_resume_replayed_tokens_total"),
        proxy_metric(stack, "tokenrelay_proxy_resume_gap_seconds_sum")))
    ready_again(stack)


def test_a_non_streamed_request_whose_replica_is_killed_starts_over(stack: Stack, uninterrupted: dict,
        words: list[int]) -> None:
    before = resumes(stack)
    reply: dict[str, Any] = {}

    def send() -> None:
        reply["r"] = httpx.post(stack.base_url + "/v1/chat/completions", json=body(False, words), timeout=120)

    sender = threading.Thread(target=send)
    sender.start()
    victim = wait_for(lambda: busy_replica(stack), 3, "the replica serving the request")
    os.kill(victim["pid"], signal.SIGKILL)
    sender.join(120)
    r = reply["r"]
    assert r.status_code == 200, r.text
    assert resumes(stack) == before + 1, "the kill did not land while the request ran"
    got, want = r.json(), uninterrupted["whole"]
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    assert got["usage"] == want["usage"]
    ready_again(stack)


def test_a_text_completion_stream_whose_replica_is_killed_goes_on_without_a_seam(
        stack: Stack, uninterrupted: dict, words: list[int]) -> None:
    before = resumes(stack)
    got: list[str] = []
    with httpx.stream("POST", stack.base_url + "/v1/completions", json=body(True, words, chat=False),
                      timeout=120) as r:
        assert r.status_code == 200
        parts = r.iter_text()
        while "".join(got).count("data: ") < 8:
            got.append(next(parts))
        victim = wait_for(lambda: busy_replica(stack), 2, "the replica serving the stream")
        os.kill(victim["pid"], signal.SIGKILL)
        got.extend(parts)
    chunks = events("".join(got))
    want = uninterrupted["completion"]
    assert not any(isinstance(c, dict) and "error" in c for c in chunks)
    assert resumes(stack) == before + 1, "the kill did not land mid-stream"
    assert content(chunks) == content(want), seam(content(chunks), content(want))
    data = [c for c in chunks if isinstance(c, dict)]
    assert len({c["id"] for c in data}) == 1 and len({c["created"] for c in data}) == 1
    assert chunks.count("[DONE]") == 1
    assert data[-1]["usage"] == [c for c in want if isinstance(c, dict)][-1]["usage"]
    ready_again(stack)
