"""`tokenrelay up` keeps what operators set across restarts, and two config files never share
deployments even with one state directory (issue 14)."""
from __future__ import annotations

import httpx
import pytest
import yaml

from runtime import head_client
from tests.integration.stack import Stack, wait_for

pytestmark = pytest.mark.integration

MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 1,
        "engine_args": {"ttft_ms": 5, "itl_ms": 5, "tokens": 4}}


def _models(stack: Stack) -> list[str]:
    return [m["id"] for m in httpx.get(stack.base_url + "/v1/models").json()["data"]]


def test_scale_survives_a_restart_and_another_config_does_not_see_it(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Stack(tmp_path / "a", [MOCK])
    try:
        first.start()
        assert head_client.scale(first.head, first.token, "mock", 2, keys=first.keys)["result"] == "scaled"
        wait_for(lambda: first.status()["deployments"]["mock"]["ready_replicas"] == 2, 15, "two replicas")
    finally:
        first.stop()
    again = Stack(tmp_path / "a", [MOCK])  # the same config file, the same state: a restart
    try:
        again.start()
        assert again.status()["deployments"]["mock"]["replicas"] == 2  # not the file's 1
        assert "differs from the config: replicas 2 (file: 1)" in again.log()
    finally:
        again.stop()
    other = Stack(tmp_path / "b", [dict(MOCK, name="other")])
    raw = yaml.safe_load(other.config_path.read_text())
    raw["head"]["state_dir"] = str(first.state_dir)  # one state directory for both configs
    other.config_path.write_text(yaml.safe_dump(raw))
    other.state_dir = first.state_dir
    try:
        other.start()
        assert _models(other) == ["other"]
    finally:
        other.stop()


def test_a_normal_start_and_stop_print_no_warning(tmp_path):
    """Issue 14: no warning on a normal start or stop. The agent says it is leaving before its replicas
    shut down, so the head does not report it silent (a failure) while they do."""
    stack = Stack(tmp_path, [MOCK])
    try:
        stack.start()
        body = {"model": "mock", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(stack.base_url + "/v1/completions", json=body, timeout=10).status_code == 200
    finally:
        stack.stop()
    log = stack.log()
    noisy = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    assert noisy == []
    assert "is leaving (shutting down)" in log


def test_a_second_up_with_the_same_ports_leaves_the_running_stack_alone(tmp_path):
    """A second `tokenrelay up` of the same config exits 1 at once: the stack runs. It used to
    start an agent that registered with the running stack's head under the same name: that stack's
    replicas left its routing table, while the second `up` printed "serving on ..." before giving up."""
    import os
    import subprocess
    import sys

    from tests.integration.stack import ROOT

    stack = Stack(tmp_path, [MOCK])
    try:
        stack.start()
        before = stack.replicas("mock")
        second = subprocess.run([sys.executable, "-m", "runtime", "up", "--config", str(stack.config_path)],
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                                text=True, timeout=30)
        assert second.returncode == 1, second.stderr
        # its launcher record says it runs (another config on the same ports: "cannot listen on ... in use")
        assert "is already running (launcher pid %d" % stack.proc.pid in second.stderr
        assert "`tokenrelay down --stack stack-" in second.stderr
        assert "serving on" not in second.stderr and "agent started" not in second.stderr
        body = {"model": "mock", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(stack.base_url + "/v1/completions", json=body, timeout=10).status_code == 200
        assert [(r["replica_id"], r["state"], r["pid"]) for r in stack.replicas("mock")] == [
            (r["replica_id"], r["state"], r["pid"]) for r in before]
        assert "re-registered" not in stack.log()
    finally:
        stack.stop()
