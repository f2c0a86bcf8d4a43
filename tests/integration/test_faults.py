"""Faults provoked on a two-agent cluster (agents on 127.0.0.2 and 127.0.0.3), mock engine.

Each test prints its measured detection/recovery times (run with -s to see them).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.integration.cluster import Cluster, timed_wait
from tests.integration.stack import wait_for

pytestmark = pytest.mark.integration

MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 4,
        "engine_args": {"ttft_ms": 20, "itl_ms": 20, "tokens": 40}, "drain_seconds": 2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), [MOCK], proxy_workers=2)
    c.start_head()
    c.start_agent("a1", "127.0.0.2")
    c.start_agent("a2", "127.0.0.3")
    c.start_proxy()
    try:
        c.wait_ready("mock", 4)
        yield c
    finally:
        c.stop_all()


def _stream_outcome(http: httpx.Client, url: str, body: dict, expected: str | None = None,
                    gaps: list[float] | None = None) -> str:
    """"ok", or how the stream failed; `expected`: the text it must carry (an uninterrupted run's);
    `gaps` gets the longest pause between two events of the stream."""
    longest = 0.0
    try:
        with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return "http_%d" % r.status_code
            events = []
            last = time.monotonic()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    now = time.monotonic()
                    if events:
                        longest = max(longest, now - last)
                    last = now
                    events.append(line)
    except httpx.HTTPError as exc:
        return "exception_%s" % type(exc).__name__
    if gaps is not None:
        gaps.append(longest)
    if not events or events[-1] != "data: [DONE]":
        return "truncated"
    if any('"error"' in e for e in events[:-1]):
        return "error_event"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    if sum(1 for c in chunks for ch in c.get("choices", []) if ch.get("finish_reason")) != 1:
        return "finish_count"
    if expected is not None and "".join(ch.get("text", "") for c in chunks for ch in c.get("choices", [])) \
            != expected:
        return "wrong_text"
    return "ok"


def _complete_outcome(http: httpx.Client, url: str, body: dict, expected: str | None) -> str:
    try:
        r = http.post(url, json=dict(body, stream=False))
    except httpx.HTTPError as exc:
        return "exception_%s" % type(exc).__name__
    if r.status_code != 200:
        return "http_%d" % r.status_code
    if expected is not None and r.json()["choices"][0]["text"] != expected:
        return "wrong_text"
    return "ok"


class StreamingClients:
    """N client threads streaming completions in a loop (and `plain` threads asking for whole ones);
    every request's outcome recorded once. With `check_text`, every response must carry the text of an
    uninterrupted run (the mock's text depends only on the prompt)."""

    def __init__(self, base_url: str, clients: int, max_tokens: int = 40, plain: int = 0,
                 check_text: bool = False) -> None:
        self.url = base_url + "/v1/completions"
        self.body = {"model": "mock", "prompt": "fault test", "max_tokens": max_tokens, "stream": True}
        self.expected = None
        if check_text:
            r = httpx.post(self.url, json=dict(self.body, stream=False), timeout=30)
            assert r.status_code == 200, r.text
            self.expected = r.json()["choices"][0]["text"]
        self.outcomes: Counter = Counter()
        self.plain: Counter = Counter()
        self.plain_log: list[tuple[float, str]] = []  # (start, outcome) of each non-streaming request
        self.log: list[tuple[float, str]] = []
        self.gaps: list[float] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        self.threads += [threading.Thread(target=self._plain_client, daemon=True) for _ in range(plain)]

    def _client(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                outcome = _stream_outcome(http, self.url, self.body, self.expected, self.gaps)
                with self._lock:
                    self.outcomes[outcome] += 1
                    self.log.append((time.monotonic(), outcome))

    def _plain_client(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                outcome = _complete_outcome(http, self.url, self.body, self.expected)
                with self._lock:
                    self.plain[outcome] += 1
                    self.plain_log.append((started, outcome))

    def start(self) -> "StreamingClients":
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> Counter:
        self._stop.set()
        for t in self.threads:
            t.join(30)
        return self.outcomes


def report(name: str, **numbers) -> None:
    print("\n[fault] %s %s" % (name, json.dumps(numbers)))


def test_replicas_spread_over_two_hosts(cluster):
    reps = cluster.replicas("mock")
    hosts = Counter(r["endpoint"].split("//")[1].split(":")[0] for r in reps)
    assert hosts == {"127.0.0.2": 2, "127.0.0.3": 2}
    agents = Counter(r["agent"] for r in reps)
    assert agents == {"a1": 2, "a2": 2}
    for _ in range(8):
        r = httpx.post(cluster.base_url + "/v1/completions", json={"model": "mock", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


def resumes(cluster) -> float:
    """Streams resumed on another replica, summed over the proxy's workers."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(cluster.base_url + "/metrics", timeout=2.0).text
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "tokenrelay_proxy_resumes"
               for s in fam.samples if s.name.endswith("_total"))


def test_sigkill_replica_while_50_clients_stream(cluster):
    """Streams mid-way on a replica killed with SIGKILL go on elsewhere: no error, the same text."""
    before = resumes(cluster)
    load = StreamingClients(cluster.base_url, 50, plain=10, check_text=True).start()
    wait_for(lambda: sum(load.outcomes.values()) >= 50, 30, "traffic")
    victim = max(cluster.replicas("mock"), key=lambda r: r["running"])
    os.kill(victim["pid"], signal.SIGKILL)
    gone = timed_wait(lambda: all(r["replica_id"] != victim["replica_id"] or r["state"] != "ready"
                                  for r in cluster.replicas("mock")), 5, "the replica to leave routing")
    back = timed_wait(lambda: any(r["replica_id"] == victim["replica_id"] and r["state"] == "ready"
                                  for r in cluster.replicas("mock")), 15, "the replica to be READY again")
    time.sleep(0.5)  # let the load run on the restored replica for a moment (observation, not sync)
    outcomes = load.stop()
    moved = resumes(cluster) - before
    gaps = sorted(load.gaps)
    report("replica SIGKILL", left_routing_s=round(gone, 3), ready_again_s=round(gone + back, 3),
           outcomes=dict(outcomes), non_streaming=dict(load.plain), resumed=moved,
           longest_gap_s=round(gaps[-1], 3))
    assert set(outcomes) == {"ok"}, outcomes  # no error event, no repeated or missing text, one finish
    assert set(load.plain) == {"ok"}, load.plain
    assert moved >= 1  # the kill did hit streams mid-way
    # the worst pause a client saw: the ITL, plus noticing the death and the new replica's TTFT (20 ms)
    assert gaps[-1] < 1.0, gaps[-5:]


def test_frozen_replica_is_routed_around_and_returns(cluster):
    """SIGSTOP: streams mid-way on the frozen replica resume elsewhere once its liveness bound (2 s of
    unanswered ZMTP pings) passes; new requests avoid it once the head marks it unhealthy."""
    before = resumes(cluster)
    load = StreamingClients(cluster.base_url, 20, max_tokens=200, check_text=True).start()
    wait_for(lambda: sum(r["running"] for r in cluster.replicas("mock")) >= 8, 30, "streams on every replica")
    victim = max(cluster.replicas("mock"), key=lambda r: r["running"])
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        detected = timed_wait(lambda: any(r["replica_id"] == victim["replica_id"] and r["state"] == "unhealthy"
                                          for r in cluster.replicas("mock")), 10, "the frozen replica unhealthy")
        http = httpx.Client(timeout=10)
        started = time.monotonic()
        results = [_stream_outcome(http, cluster.base_url + "/v1/completions",
                                   {"model": "mock", "prompt": "x", "max_tokens": 3, "stream": True})
                   for _ in range(12)]
        served_in = time.monotonic() - started
        wait_for(lambda: resumes(cluster) > before, 10, "the frozen replica's streams to resume")
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    back = timed_wait(lambda: any(r["replica_id"] == victim["replica_id"] and r["state"] == "ready"
                                  for r in cluster.replicas("mock")), 10, "the thawed replica READY")
    outcomes = load.stop()
    gaps = sorted(load.gaps)
    report("replica SIGSTOP", unhealthy_after_s=round(detected, 3), ready_after_sigcont_s=round(back, 3),
           twelve_requests_s=round(served_in, 3), outcomes=dict(outcomes), resumed=resumes(cluster) - before,
           longest_gap_s=round(gaps[-1], 3))
    assert results == ["ok"] * 12
    assert served_in < 5.0
    assert set(outcomes) == {"ok"}, outcomes
    assert gaps[-1] < 4.0  # the 2 s liveness bound, the new replica's start, and a loaded machine


def test_sigkill_proxy_worker_only_hurts_its_own_requests(cluster):
    load = StreamingClients(cluster.base_url, 20).start()
    wait_for(lambda: sum(load.outcomes.values()) >= 40, 30, "traffic")
    workers = cluster.proxy_workers_pids()
    assert len(workers) == 2
    killed_at = time.monotonic()
    os.kill(workers[0], signal.SIGKILL)
    replaced = timed_wait(lambda: len(set(cluster.proxy_workers_pids()) - set(workers)) == 1, 15,
                          "gunicorn to replace the worker")
    wait_for(lambda: sum(1 for t, o in load.log if t > killed_at + replaced + 1) >= 40, 30, "traffic after")
    outcomes = load.stop()
    after = Counter(o for t, o in load.log if t > killed_at + replaced + 1)
    # the replicas noticed the dead worker and stopped its requests
    wait_for(lambda: sum(r["running"] for r in cluster.replicas("mock")) == 0, 5, "no orphaned generation")
    report("proxy worker SIGKILL", replaced_after_s=round(replaced, 3), outcomes=dict(outcomes))
    failed = sum(n for o, n in outcomes.items() if o != "ok")
    assert failed <= 20  # at most the streams the dead worker held (one per client)
    assert outcomes["ok"] > failed
    assert set(after) == {"ok"}


def test_sigkill_head_serving_goes_on_and_state_returns(cluster):
    before = {r["replica_id"]: r["pid"] for r in cluster.replicas("mock")}
    load = StreamingClients(cluster.base_url, 10).start()
    wait_for(lambda: sum(load.outcomes.values()) >= 20, 30, "traffic")
    cluster.kill("head")
    down_for = float(os.environ.get("TOKENRELAY_HEAD_DOWN_SECONDS", "60"))
    stale = timed_wait(lambda: "stale" in httpx.get(cluster.base_url + "/ready").text, 10,
                       "/ready to report the stale table")
    probes: Counter = Counter()
    end = time.monotonic() + max(0.0, down_for - stale)
    while time.monotonic() < end:  # the outage itself: serving, and /ready, must go on all along
        probes[httpx.get(cluster.base_url + "/ready").status_code] += 1
        time.sleep(0.2)
    during = Counter(load.outcomes)
    cluster.start_head()
    recovered = timed_wait(lambda: cluster.ready("mock", 4), 20, "the head to recover")
    outcomes = load.stop()
    after = {r["replica_id"]: r["pid"] for r in cluster.replicas("mock")}
    report("head SIGKILL", outage_s=down_for, stale_after_s=round(stale, 3), ready_probes=dict(probes),
           recovered_after_restart_s=round(recovered, 3), outcomes_during=dict(during), outcomes=dict(outcomes))
    assert set(outcomes) == {"ok"}, outcomes
    assert set(probes) == {200}, probes  # a load balancer would have kept the proxy
    assert during["ok"] >= 5 * down_for  # ten clients kept streaming all along
    assert after == before  # same replicas, same processes: adopted, not restarted
    assert all(r["restarts"] == 0 or r["replica_id"] in before for r in cluster.replicas("mock"))


def test_sigkill_agent_replicas_move_to_the_other_host(cluster):
    load = StreamingClients(cluster.base_url, 10).start()
    wait_for(lambda: sum(load.outcomes.values()) >= 20, 30, "traffic")
    killed_at = time.monotonic()
    cluster.kill("agent-a1")
    left = timed_wait(lambda: all(r["agent"] != "a1" for r in cluster.replicas("mock")), 10,
                      "a1's replicas to leave")
    moved = timed_wait(lambda: cluster.ready("mock", 4), 20, "4 replicas ready again on a2")
    wait_for(lambda: sum(1 for t, o in load.log if t > killed_at + left + moved + 0.5) >= 20, 30, "traffic after")
    outcomes = load.stop()
    after = Counter(o for t, o in load.log if t > killed_at + left + moved + 0.5)
    reps = cluster.replicas("mock")
    report("agent SIGKILL", replicas_left_routing_s=round(left, 3), replaced_and_ready_s=round(left + moved, 3),
           outcomes=dict(outcomes))
    assert {r["agent"] for r in reps} == {"a2"} and all(r["endpoint"].startswith("tcp://127.0.0.3:") for r in reps)
    assert set(after) == {"ok"}
    assert outcomes["ok"] > 0


def test_adopt_mode_replicas_survive_an_agent_restart(tmp_path):
    """With --adopt, replicas outlive a killed agent; the restarted agent adopts them (no restart)."""
    from tests.integration.stack import free_port
    c = Cluster(tmp_path, [dict(MOCK, replicas=2)], proxy_workers=1)
    endpoint = "tcp://127.0.0.1:%d" % free_port()
    args = ["--adopt", "--replica-endpoint", endpoint]
    try:
        c.start_head()
        c._spawn("agent-a1", ["agent", "--head", c.head, "--host", "127.0.0.2", "--agent-id", "a1"] + args)
        c.start_proxy()
        c.wait_ready("mock", 2)
        before = {r["replica_id"]: r["pid"] for r in c.replicas("mock")}
        load = StreamingClients(c.base_url, 4).start()
        wait_for(lambda: sum(load.outcomes.values()) >= 8, 20, "traffic")
        c.kill("agent-a1")
        time.sleep(1.0)  # the agent stays dead a moment; replicas keep serving meanwhile
        c._spawn("agent-a1", ["agent", "--head", c.head, "--host", "127.0.0.2", "--agent-id", "a1"] + args)
        wait_for(lambda: "adopted 2 running replica(s)" in c.log("agent-a1"), 15, "the new agent to adopt")
        c.wait_ready("mock", 2)
        outcomes = load.stop()
        after = {r["replica_id"]: r["pid"] for r in c.replicas("mock")}
        report("agent restart in adopt mode", outcomes=dict(outcomes))
        assert after == before
        assert set(outcomes) == {"ok"}, outcomes
    finally:
        c.stop_all()
        for pid in before.values() if "before" in locals() else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
