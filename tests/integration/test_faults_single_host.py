"""Faults on one host's `tokenrelay up` stack (3 mock replicas, one proxy worker): the agent SIGKILLed
under load. The replicas outlive it (the launcher runs the agent in adopt mode), the launcher restarts
it, and the new agent adopts them: same processes, and no client notices. Ctrl-C still stops the
replicas the agent left; a SIGKILLed launcher takes them with it.
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter

import httpx
import psutil
import pytest

from tests.integration.stack import Stack, wait_for
from tests.integration.test_faults import StreamingClients, report

pytestmark = pytest.mark.integration

MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 3,
        "engine_args": {"ttft_ms": 50, "itl_ms": 50, "tokens": 40}, "max_ongoing_requests": 64,
        "routing": {"queue_size": 64}}  # room in the wait queue for every client of the test


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = Stack(tmp_path_factory.mktemp("single"), [MOCK], workers=1)
    s.start()
    yield s
    s.stop()


def agent_pid(stack: Stack) -> int:
    for p in stack.tree():
        cmd = p.cmdline()
        if cmd[1:3] == ["-m", "agent"]:
            return p.pid
    raise AssertionError("no agent process")


def replica_pids(stack: Stack) -> set[int]:
    return {p.pid for p in stack.tree() if p.cmdline()[1:3] == ["-m", "model_proc"]}


def test_sigkill_agent_under_load_no_client_notices(stack: Stack) -> None:
    load = StreamingClients(stack.base_url, 30, plain=10, check_text=True).start()
    wait_for(lambda: sum(load.outcomes.values()) >= 30, 30, "traffic")
    before = {r["replica_id"]: r["pid"] for r in stack.replicas("mock")}
    killed_at = time.monotonic()
    os.kill(agent_pid(stack), signal.SIGKILL)
    # new requests in the meantime: how long the proxy answers 503 (no replica at all)
    probes: list[tuple[float, int]] = []
    http = httpx.Client(timeout=10)
    while time.monotonic() - killed_at < 8:
        r = http.post(stack.base_url + "/v1/completions", json={"model": "mock", "prompt": "probe", "max_tokens": 1})
        probes.append((time.monotonic() - killed_at, r.status_code))
        time.sleep(0.05)
    wait_for(lambda: "adopted 3 running replica(s)" in stack.log(), 15, "the restarted agent to adopt")
    wait_for(stack.all_ready, 15, "the head to list the adopted replicas")
    outcomes = load.stop()
    after = {r["replica_id"]: r["pid"] for r in stack.replicas("mock")}
    refused = [t for t, status in probes if status != 200]
    report("agent SIGKILL (one host)", outcomes=dict(outcomes), non_streaming=dict(load.plain),
           probes=dict(Counter(s for _, s in probes)), refused_until_s=round(max(refused, default=0.0), 3),
           longest_gap_s=round(max(load.gaps), 3))
    assert after == before  # the same replica processes, adopted by the new agent
    assert set(outcomes) == {"ok"}, outcomes  # streams went on: the agent is not on the token path
    assert set(load.plain) == {"ok"}, load.plain
    assert refused == [], probes  # new requests were served while no agent ran


def test_ctrl_c_stops_the_replicas_a_dead_agent_left(tmp_path) -> None:
    """After an agent crash the replicas are the launcher's (its subreaper) children: Ctrl-C stops them."""
    s = Stack(tmp_path, [dict(MOCK, replicas=2)], workers=1).start()
    try:
        replicas = replica_pids(s)
        assert len(replicas) == 2
        os.kill(agent_pid(s), signal.SIGKILL)
        wait_for(lambda: "adopted 2 running replica(s)" in s.log(), 15, "the restarted agent to adopt")
        assert replica_pids(s) == replicas  # reparented to the launcher, still in the stack's tree
    finally:
        elapsed, left = s.stop()
    assert left == [], left
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in replicas)


def test_a_killed_launcher_takes_the_replicas_with_it(tmp_path) -> None:
    """Replicas outlive their agent, not their stack: SIGKILL the launcher and they exit by themselves."""
    s = Stack(tmp_path, [dict(MOCK, replicas=2)], workers=1).start()
    replicas = [psutil.Process(p) for p in replica_pids(s)]
    everything = s.tree()
    try:
        s.proc.kill()
        gone, alive = psutil.wait_procs(replicas, timeout=10)
        assert alive == [], alive
    finally:
        for p in everything:  # whatever the test itself leaves (nothing, if the guards work)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_ctrl_c_while_the_agent_is_dead_stops_the_replicas_it_left(tmp_path) -> None:
    """Ctrl-C, and the agent dies before the launcher reaches it (it stops the proxy first): no agent
    stops the replicas, so the launcher, their subreaper by then, stops them itself."""
    s = Stack(tmp_path, [dict(MOCK, replicas=2)], workers=1).start()
    replicas = replica_pids(s)
    tree = s.tree()
    s.proc.send_signal(signal.SIGINT)
    os.kill(agent_pid(s), signal.SIGKILL)
    try:
        s.proc.wait(20)
    finally:
        _, alive = psutil.wait_procs(tree, timeout=2)
        for p in alive:
            p.kill()
    assert alive == [], alive
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in replicas)
    assert "stopping 2 replica(s) no agent stopped" in s.log()
