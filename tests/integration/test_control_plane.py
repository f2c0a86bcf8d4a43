"""Operating a running stack through the CLI: deploy, scale, delete, rolling updates, failed replicas."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
import yaml

from tests.integration.stack import ROOT, Stack, wait_for

pytestmark = pytest.mark.integration

BASE = {"name": "svc", "engine": "mock", "model": "mock", "replicas": 2,
        "engine_args": {"ttft_ms": 10, "itl_ms": 10, "tokens": 30}, "drain_seconds": 3}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("cp"), [BASE], workers=2)
    s.start()
    yield s
    s.stop()


def cli(stack, *args, token=True):
    cmd = [sys.executable, "-m", "runtime", *args, "--head", stack.head, "--json"]
    if token:
        cmd += ["--state-dir", str(stack.state_dir)]
    else:
        cmd += ["--state-dir", str(stack.tmp / "nowhere"), "--curve-dir", str(stack.keys)]  # operator key, no token
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    body = json.loads(out.stdout) if out.stdout.strip().startswith(("{", "[")) else out.stdout
    return out.returncode, body, out.stderr


def write_spec(stack, name, spec):
    path = stack.tmp / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_commands_need_the_admin_token(stack):
    code, out, err = cli(stack, "status", token=False)
    assert code == 1 and "admin token required" in err


def test_deploy_scale_delete_are_idempotent_with_json(stack):
    spec = dict(BASE, name="extra", replicas=1)
    path = write_spec(stack, "extra.yaml", spec)
    code, out, _ = cli(stack, "deploy", "-f", path)
    assert code == 0 and out == {"ok": True, "result": "created", "generation": 1}
    code, out, _ = cli(stack, "deploy", "-f", path)
    assert code == 0 and out["result"] == "unchanged"
    wait_for(lambda: stack.status()["deployments"]["extra"]["ready_replicas"] == 1, 15, "extra ready")
    code, out, _ = cli(stack, "scale", "extra", "2")
    assert code == 0 and out["result"] == "scaled"
    wait_for(lambda: stack.status()["deployments"]["extra"]["ready_replicas"] == 2, 15, "scaled up")
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": "extra", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200
    code, out, _ = cli(stack, "status")
    assert code == 0 and {d["name"] for d in out["deployments"]} == {"svc", "extra"}
    assert out["agents"][0]["cpus"] >= 1 and out["agents"][0]["last_heartbeat_s"] < 2
    code, out, _ = cli(stack, "delete", "extra")
    assert code == 0 and out["result"] == "deleted"
    code, out, _ = cli(stack, "delete", "extra")
    assert code == 0 and out["result"] == "absent"
    wait_for(lambda: httpx.post(stack.base_url + "/v1/completions",
                                json={"model": "extra", "prompt": "x"}).status_code == 404, 5, "extra gone")


def test_bad_spec_is_rejected_with_field_and_reason(stack):
    path = write_spec(stack, "bad.yaml", dict(BASE, name="bad", replicas="many"))
    code, out, err = cli(stack, "deploy", "-f", path)
    # the CLI checks the file as the head does before sending it: a bad file, exit 2
    assert code == 2 and "spec.replicas: must be an integer >= 0" in out["error"]
    path = write_spec(stack, "huge.yaml", dict(BASE, name="huge", gpus=1000))  # only the head can tell
    code, out, err = cli(stack, "deploy", "-f", path)
    assert code == 1 and "unplaceable" in out["error"]
    code, out, err = cli(stack, "scale", "nope", "3")
    assert code == 1 and "not_found" in out["error"]


def _streaming_load(stack, model, outcomes, stop, clients=8):
    def client():
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    with http.stream("POST", stack.base_url + "/v1/completions",
                                     json={"model": model, "prompt": "u", "max_tokens": 30, "stream": True}) as r:
                        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
                        ok = r.status_code == 200 and lines[-1] == "data: [DONE]" and \
                            not any('"error"' in x for x in lines)
                        outcomes["ok" if ok else "failed:%d" % r.status_code] += 1
                except httpx.HTTPError as exc:
                    outcomes["failed:%s" % type(exc).__name__] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def test_rolling_update_under_load_fails_no_request(stack):
    old = {r["replica_id"] for r in stack.replicas("svc")}
    outcomes: Counter = Counter()
    stop = threading.Event()
    threads = _streaming_load(stack, "svc", outcomes, stop)
    wait_for(lambda: outcomes["ok"] >= 20, 20, "traffic")
    path = write_spec(stack, "v2.yaml", dict(BASE, engine_args=dict(BASE["engine_args"], tokens=31)))
    started = time.monotonic()
    code, out, _ = cli(stack, "deploy", "-f", path)
    assert code == 0 and out == {"ok": True, "result": "updated", "generation": 2}

    def rolled():
        reps = stack.replicas("svc")
        return len(reps) == 2 and all(r["generation"] == 2 and r["state"] == "ready" for r in reps)
    wait_for(rolled, 30, "the rolling update to finish")
    took = time.monotonic() - started
    count_at_end = sum(outcomes.values())
    wait_for(lambda: sum(outcomes.values()) >= count_at_end + 16, 20, "traffic on the new generation")
    stop.set()
    for t in threads:
        t.join(30)
    print("\n[rolling update] %.2fs, outcomes %s" % (took, dict(outcomes)))
    assert set(outcomes) == {"ok"}, outcomes
    assert not old & {r["replica_id"] for r in stack.replicas("svc")}


def test_update_with_no_room_beside_the_old_replicas_replaces_one_at_a_time_under_load(stack):
    """The host's cores are all reserved by the deployment's two replicas: no new replica fits beside
    them, so the update retires one old replica (drained), places one new, and so on; 0 failures."""
    code, out, _ = cli(stack, "status")
    free = out["agents"][0]["cpus"] - sum(d["cpus"] * d["replicas"] for d in out["deployments"])
    tight = dict(BASE, name="tight", cpus=free / 2)
    assert cli(stack, "deploy", "-f", write_spec(stack, "tight.yaml", tight))[0] == 0
    wait_for(lambda: stack.status()["deployments"]["tight"]["ready_replicas"] == 2, 20, "tight ready")
    old = {r["replica_id"] for r in stack.replicas("tight")}
    outcomes: Counter = Counter()
    stop = threading.Event()
    threads = _streaming_load(stack, "tight", outcomes, stop)
    wait_for(lambda: outcomes["ok"] >= 20, 20, "traffic")
    path = write_spec(stack, "tight2.yaml", dict(tight, engine_args=dict(BASE["engine_args"], tokens=31)))
    started = time.monotonic()
    code, out, _ = cli(stack, "deploy", "-f", path)
    assert code == 0 and out["result"] == "updated"
    seen_notes = set()

    def rolled():
        dep = stack.status()["deployments"]["tight"]
        seen_notes.add(dep.get("rollout_note", ""))
        reps = dep["replica_list"]
        return len(reps) == 2 and all(r["generation"] == 2 and r["state"] == "ready" for r in reps)
    wait_for(rolled, 40, "the in-place rolling update to finish")
    took = time.monotonic() - started
    count_at_end = sum(outcomes.values())
    wait_for(lambda: sum(outcomes.values()) >= count_at_end + 16, 20, "traffic on the new generation")
    stop.set()
    for t in threads:
        t.join(30)
    print("\n[in-place rolling update] %.2fs, outcomes %s, notes %s" % (took, dict(outcomes), seen_notes))
    assert set(outcomes) == {"ok"}, outcomes
    assert any("one at a time" in n for n in seen_notes)
    assert not old & {r["replica_id"] for r in stack.replicas("tight")}
    assert cli(stack, "delete", "tight")[0] == 0


def test_replica_that_cannot_load_is_failed_then_retried_with_backoff(stack):
    path = write_spec(stack, "broken.yaml", dict(BASE, name="broken", replicas=1, engine_args={"warp": 9}))
    assert cli(stack, "deploy", "-f", path)[0] == 0
    dep = wait_for(lambda: (lambda d: d if d["failures"] else None)(stack.status()["deployments"]["broken"]),
                   20, "the broken replica to fail and be unassigned")
    assert "cannot start" in dep["failures"] and "next try in" in dep["failures"]
    assert dep["state"] == "pending" and dep["pending_reason"].startswith("retrying in")
    first = dep["failures"].split("replica ")[1].split(" ")[0]
    # a replacement (a new replica id) is placed after the backoff, and fails again: the count grows
    dep = wait_for(lambda: (lambda d: d if d["failures"].startswith("2 failure(s)") else None)(
        stack.status()["deployments"]["broken"]), 30, "a second, backed-off attempt")
    assert first not in dep["failures"] and "next try in" in dep["failures"]
    code, out, _ = cli(stack, "status")
    assert [d["failures"] for d in out["deployments"] if d["name"] == "broken"][0].startswith("2 failure(s)")
    assert cli(stack, "delete", "broken")[0] == 0
