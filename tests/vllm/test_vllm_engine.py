"""VllmEngine through the Engine interface, on the tiny random Llama (gibberish text, fast).

One engine for the whole module (start-up is ~10-15 s on two cores). Request ids are unique per test.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.vllm.harness import EngineHarness, skip_without_vllm, start_engine, stop_engine

skip_without_vllm()

from model_proc.engine import EngineLoadError, EngineRequestError, EngineStats  # noqa: E402
from model_proc.vllm_engine import VllmEngine  # noqa: E402
from runtime.protocol import ChatMessage, GenerateRequest, SamplingParams  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(240)]

MAX_MODEL_LEN = 512
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def eng(tiny_model: Path) -> Iterator[EngineHarness]:
    harness = start_engine(str(tiny_model), {"max_model_len": MAX_MODEL_LEN})
    yield harness
    stop_engine(harness)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def req(request_id: str, prompt: str = "def handle(request):", **params) -> GenerateRequest:
    return GenerateRequest(request_id, prompt=prompt, params=SamplingParams(**params))


def test_start_honours_engine_args_and_is_idle(eng: EngineHarness) -> None:
    assert eng.engine._max_model_len == MAX_MODEL_LEN
    assert eng.engine.stats() == EngineStats(0, 0, 0.0)
    assert eng.engine.steps >= 1  # the warm-up token went through the scheduler


def test_deltas_stream_and_counts_are_running_totals(eng: EngineHarness, tokenizer) -> None:
    final = eng.generate(req("stream", max_tokens=20, **GREEDY))
    events = eng.sink.deltas["stream"]
    assert final.finish == "length" and final.completion_tokens == 20
    assert len(events) >= 5, "expected a stream of deltas, got %d" % len(events)
    assert all(e.finish is None for e in events[:-1])
    counts = [e.completion_tokens for e in events]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    expected_prompt = len(tokenizer("def handle(request):").input_ids)
    assert {e.prompt_tokens for e in events} == {expected_prompt}
    assert eng.sink.text("stream") == "".join(e.text for e in events) != ""


def test_relayed_chat_uses_the_models_template_and_counts_its_tokens(eng: EngineHarness, tokenizer) -> None:
    """A chat body goes to vLLM's serving layer: its JSON answer, and the delta's counts, are vLLM's."""
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
    body = json.dumps({"messages": messages, "max_tokens": 5}).encode()  # no model: the served one
    final = eng.generate(GenerateRequest("chat", endpoint="/v1/chat/completions", body=body))
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    answer = json.loads(eng.sink.text("chat"))
    assert answer["usage"]["prompt_tokens"] == final.prompt_tokens == len(expected)
    assert answer["usage"]["completion_tokens"] == final.completion_tokens
    assert final.finish == "stop"  # the end of vLLM's response body
    assert answer["choices"][0]["finish_reason"] in ("length", "stop")


def test_unrelayed_chat_messages_are_refused_naming_them(eng: EngineHarness) -> None:
    with pytest.raises(EngineRequestError) as err:
        eng.add(GenerateRequest("old-chat", messages=[ChatMessage("user", "hi")]))
    assert err.value.param == "messages" and "relayed" in str(err.value)


def test_stop_string_ends_the_text_before_it(eng: EngineHarness) -> None:
    eng.generate(req("free", max_tokens=40, **GREEDY))
    full = eng.sink.text("free")
    pieces = [e.text for e in eng.sink.deltas["free"][3:] if e.text.strip()]
    assert pieces, "greedy text has no usable stop piece: %r" % full
    stop = pieces[0]
    final = eng.generate(req("stopped", max_tokens=40, stop=[stop], **GREEDY))
    assert final.finish == "stop"
    assert eng.sink.text("stopped") == full[:full.index(stop)]


def test_same_seed_same_text_other_seed_other_text(eng: EngineHarness) -> None:
    sampled = dict(max_tokens=24, temperature=1.0, seed=1234)
    eng.add(req("seed-a", **sampled))
    eng.add(req("seed-b", **sampled))  # batched together: per-request seeds still hold
    eng.add(req("seed-c", **{**sampled, "seed": 99}))
    eng.run(eng.sink.wait("seed-a", "seed-b", "seed-c"))
    assert eng.sink.text("seed-a") == eng.sink.text("seed-b")
    assert eng.sink.text("seed-a") != eng.sink.text("seed-c")


def test_top_k_top_p_and_penalties_reach_the_sampler(eng: EngineHarness) -> None:
    eng.generate(req("greedy", max_tokens=24, **GREEDY))
    eng.generate(req("top-k-1", max_tokens=24, temperature=1.0, top_k=1, seed=5))
    eng.generate(req("top-p-tiny", max_tokens=24, temperature=1.0, top_p=1e-6, seed=5))
    eng.generate(req("penalised", max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0, **GREEDY))
    greedy = eng.sink.text("greedy")
    assert eng.sink.text("top-k-1") == greedy  # top_k=1 is greedy whatever the temperature
    assert eng.sink.text("top-p-tiny") == greedy
    assert eng.sink.text("penalised") != greedy  # repeats cost more: the greedy path changes


@pytest.mark.parametrize("params, param", [
    (dict(temperature=5.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-5), "top_k"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_bad_parameters_are_400_naming_the_parameter(eng: EngineHarness, params: dict, param: str) -> None:
    with pytest.raises(EngineRequestError) as err:
        eng.add(req("bad-%s" % param, **params))
    assert err.value.status == 400 and err.value.param == param
    assert eng.engine.stats().running == 0


def test_prompt_longer_than_context_is_400_with_the_limits(eng: EngineHarness) -> None:
    long_prompt = "alpha beta gamma delta " * 400
    with pytest.raises(EngineRequestError) as err:
        eng.add(req("too-long", prompt=long_prompt, max_tokens=10))
    assert err.value.status == 400 and err.value.param == "prompt"
    assert str(MAX_MODEL_LEN) in str(err.value)


def test_missing_prompt_and_duplicate_ids_are_rejected(eng: EngineHarness) -> None:
    with pytest.raises(EngineRequestError) as err:
        eng.add(GenerateRequest("nothing"))
    assert err.value.param == "prompt"
    eng.add(req("dup", max_tokens=200))
    try:
        with pytest.raises(EngineRequestError, match="duplicate"):
            eng.add(req("dup", max_tokens=5))
    finally:
        eng.abort("dup")


def test_abort_stops_one_request_within_a_second_while_another_continues(eng: EngineHarness) -> None:
    async def scenario() -> float:
        eng.engine.add_request(req("victim", max_tokens=400, **GREEDY))
        eng.engine.add_request(req("survivor", prompt="class Handler:", max_tokens=400, **GREEDY))
        while not (eng.sink.deltas.get("victim") and eng.sink.deltas.get("survivor")):
            await asyncio.sleep(0.005)
        eng.engine.abort("victim")
        aborted_at = time.monotonic()
        eng.engine.abort("victim")  # idempotent
        eng.engine.abort("never-existed")
        survivor_tokens = eng.sink.deltas["survivor"][-1].completion_tokens
        # vLLM's own scheduler must drop the victim: only the survivor left running
        while eng.engine._snapshot.running > 1:
            assert time.monotonic() - aborted_at < 1.0, "victim still scheduled 1 s after abort"
            await asyncio.sleep(0.01)
        await eng.sink.wait("survivor", timeout=60)
        assert eng.sink.final("survivor").completion_tokens > survivor_tokens
        return aborted_at

    aborted_at = eng.run(scenario())
    victim = eng.sink.deltas["victim"]
    assert all(e.at <= aborted_at for e in victim), "victim emitted after its abort"
    assert victim[-1].finish is None and "victim" not in eng.sink.errors
    assert eng.sink.final("survivor").finish == "length"
    assert eng.sink.final("survivor").completion_tokens == 400


def test_concurrent_requests_batch_and_each_finish(eng: EngineHarness) -> None:
    ids = ["conc-%d" % i for i in range(8)]
    seen: list[EngineStats] = []

    async def scenario() -> None:
        for i, request_id in enumerate(ids):
            eng.engine.add_request(req(request_id, prompt="item %d:" % i, max_tokens=48, **GREEDY))
        while not all(eng.sink.ended(r) for r in ids):
            seen.append(eng.engine.stats())
            await asyncio.sleep(0.005)

    started = time.monotonic()
    eng.run(scenario())
    elapsed = time.monotonic() - started
    for request_id in ids:
        final = eng.sink.final(request_id)
        assert (final.finish, final.completion_tokens) == ("length", 48), request_id
    assert max(s.running + s.waiting for s in seen) == len(ids)
    assert max(s.running for s in seen) > 1, "requests did not share engine steps"
    assert max(s.kv_cache_usage for s in seen) > 0.0
    assert eng.engine.stats() == EngineStats(0, 0, eng.engine.stats().kv_cache_usage)
    print("\n8 concurrent x 48 tokens: %.2f s, %.0f tok/s" % (elapsed, 8 * 48 / elapsed))


def test_stats_are_cheap_enough_for_a_250_ms_status_loop(eng: EngineHarness) -> None:
    started = time.perf_counter()
    for _ in range(1000):
        eng.engine.stats()
    assert time.perf_counter() - started < 0.1  # 1000 calls; the status loop makes 4 a second


def test_single_stream_speed_is_reported(eng: EngineHarness) -> None:
    started = time.monotonic()
    final = eng.generate(req("speed", max_tokens=128, **GREEDY))
    elapsed = time.monotonic() - started
    assert final.completion_tokens == 128
    print("\n1 stream x 128 tokens: %.2f s, %.0f tok/s" % (elapsed, 128 / elapsed))


# --------------------------------------------------------------------------- load errors (no engine start)


def run_start(model: str, engine_args: dict) -> None:
    from tests.vllm.harness import RecordingSink

    engine = VllmEngine(model, engine_args)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(engine.start(RecordingSink()), 120))
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()


def test_missing_model_path_is_a_load_error(vllm_env: Path) -> None:
    with pytest.raises(EngineLoadError, match="does not exist"):
        run_start(str(vllm_env / "no-such-model"), {})


def test_directory_without_a_checkpoint_is_a_load_error(tmp_path: Path, vllm_env: Path) -> None:
    with pytest.raises(EngineLoadError, match="config.json"):
        run_start(str(tmp_path), {})


def test_unloadable_checkpoint_is_a_load_error_that_says_why(tmp_path: Path, vllm_env: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(EngineLoadError, match="cannot load model"):
        run_start(str(tmp_path), {})


def test_unknown_engine_arg_is_a_load_error(tiny_model: Path) -> None:
    with pytest.raises(EngineLoadError, match="no_such_knob"):
        run_start(str(tiny_model), {"no_such_knob": 1})
