"""Routing policies on a real stack (mock engine, two proxy workers): prompt-prefix affinity, session
affinity on X-Session-ID, and the load guard that spreads a hot key when its replica gets busy.

Which replica served a request is read from the replicas' own `requests_finished` counters (via the
head's status, which trails by up to ~1 s), so each check waits for the counts to add up.
"""
from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest

from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

ENGINE = {"ttft_ms": 5, "itl_ms": 5, "tokens": 3}
PFX = {"name": "pfx", "engine": "mock", "model": "mock", "replicas": 3, "engine_args": ENGINE,
       "routing": {"policy": "prefix", "prefix_chars": 40, "max_imbalance": 2}}
SESS = {"name": "sess", "engine": "mock", "model": "mock", "replicas": 3, "engine_args": ENGINE,
        "routing": {"max_imbalance": 2}}
HOT = {"name": "hot", "engine": "mock", "model": "mock", "replicas": 3,
       "engine_args": {"ttft_ms": 20, "itl_ms": 20, "tokens": 40},
       "routing": {"policy": "prefix", "prefix_chars": 40, "max_imbalance": 2}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = Stack(tmp_path_factory.mktemp("routing"), [PFX, SESS, HOT], workers=2)
    s.start()
    yield s
    s.stop()


def finished(stack: Stack, deployment: str) -> Counter:
    return Counter({r["replica_id"]: r["requests_finished"] for r in stack.replicas(deployment)})


def served_by(stack: Stack, deployment: str, before: Counter, total: int) -> Counter:
    """Requests per replica since `before`, once all `total` of them show in the counters."""
    def delta() -> Counter | None:
        d = finished(stack, deployment) - before
        return d if sum(d.values()) >= total else None
    return wait_for(delta, 5, "%d finished requests of %s in the status" % (total, deployment))


def complete(stack: Stack, deployment: str, prompt: str, headers: dict | None = None) -> None:
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": deployment, "prompt": prompt},
                   headers=headers or {}, timeout=10)
    assert r.status_code == 200, r.text


def test_requests_sharing_a_prompt_prefix_go_to_one_replica(stack: Stack) -> None:
    for system in ("You are a terse assistant for ACME corp. ", "You are a pirate who answers in rhyme!! "):
        before = finished(stack, "pfx")
        for i in range(8):
            complete(stack, "pfx", system + "question number %d?" % i)  # 8 requests over both workers
        assert len(served_by(stack, "pfx", before, 8)) == 1


def test_chat_turns_sharing_a_start_go_to_one_replica(stack: Stack) -> None:
    before = finished(stack, "pfx")
    history = [{"role": "system", "content": "Long shared system prompt about relays"}]
    for i in range(6):
        history = history + [{"role": "user", "content": "turn %d" % i}]
        r = httpx.post(stack.base_url + "/v1/chat/completions", json={"model": "pfx", "messages": history},
                       timeout=10)
        assert r.status_code == 200
    assert len(served_by(stack, "pfx", before, 6)) == 1


def test_session_id_keeps_a_session_on_one_replica(stack: Stack) -> None:
    before = finished(stack, "sess")
    for i in range(8):
        complete(stack, "sess", "unrelated prompt %d" % i, {"X-Session-ID": "session-42"})
    assert len(served_by(stack, "sess", before, 8)) == 1


def test_without_a_key_p2c_spreads_the_load(stack: Stack) -> None:
    before = finished(stack, "sess")
    threads = [threading.Thread(target=complete, args=(stack, "sess", "p%d" % i)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(served_by(stack, "sess", before, 12)) >= 2


def test_a_hot_prefix_spills_to_other_replicas_when_its_replica_is_busy(stack: Stack) -> None:
    before = finished(stack, "hot")
    prompt = "The one system prompt everybody uses, then: q"
    threads = [threading.Thread(target=complete, args=(stack, "hot", prompt + str(i))) for i in range(15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    per_replica = served_by(stack, "hot", before, 15)
    assert len(per_replica) >= 2, per_replica  # the load guard moved the overflow elsewhere
    assert max(per_replica.values()) >= 5  # ...while the prefix's own replica still took the most
