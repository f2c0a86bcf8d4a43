"""Scaling a CPU vLLM deployment with `cpus: 0` from 1 to 2 on this 2-core machine (issue 14's first
case): the second replica gets core 1 at once, the first is restarted on core 0 once the second is
ready, requests keep succeeding throughout, and a normal stop logs no SIGKILL."""
from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from tests.vllm.harness import skip_without_vllm

skip_without_vllm()

import httpx  # noqa: E402
import psutil  # noqa: E402

from runtime import head_client  # noqa: E402
from tests.integration.stack import Stack, wait_for  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def stack(vllm_env: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if len(psutil.Process().cpu_affinity() or []) != 2:
        pytest.skip("written for a 2-core host")
    tiny = {"name": "tiny", "engine": "vllm", "model": str(tiny_model), "replicas": 1,
            "engine_args": {"max_model_len": 512}, "drain_seconds": 2}
    s = Stack(tmp_path_factory.mktemp("fleet"), [tiny], workers=1)
    try:
        s.start(timeout=180)
        yield s
    finally:
        s.stop()


def _binds(stack: Stack) -> dict[str, str]:
    out = {}
    for r in stack.replicas("tiny"):
        if r["state"] == "ready" and r["pid"]:
            out[r["replica_id"]] = psutil.Process(r["pid"]).environ().get("VLLM_CPU_OMP_THREADS_BIND", "")
    return out


def test_scale_to_two_on_two_cores_without_an_outage_then_a_quiet_stop(stack: Stack) -> None:
    (first,) = _binds(stack).items()
    assert first[1] == "0-1"
    outcomes: Counter = Counter()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                r = http.post(stack.base_url + "/v1/completions",
                              json={"model": "tiny", "prompt": "x", "max_tokens": 8})
                outcomes["ok" if r.status_code == 200 else "http_%d" % r.status_code] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    started = time.monotonic()
    assert head_client.scale(stack.head, stack.token, "tiny", 2, keys=stack.keys)["result"] == "scaled"
    binds = wait_for(lambda: (lambda b: b if sorted(b.values()) == ["0", "1"] else None)(_binds(stack)),
                     180.0, "two tiny replicas on one core each")
    took = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(60)
    print("\n[scale 1->2 on 2 cores] %.1f s, binds %s, outcomes %s" % (took, binds, dict(outcomes)))
    assert binds[first[0]] == "0" and set(outcomes) == {"ok"}, (binds, outcomes)
    with pytest.raises(head_client.HeadRefused, match="unplaceable"):
        head_client.scale(stack.head, stack.token, "tiny", 3, keys=stack.keys)
    elapsed, leftovers = stack.stop()
    print("[stop] %.1f s" % elapsed)
    log = stack.log()
    assert "ignored SIGTERM" not in log and leftovers == [], leftovers
    assert "unexpected ControlReply" not in log and "no snapshot reply" not in log
