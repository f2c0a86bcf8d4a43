"""Metrics of a real stack (mock engine): the head's SD file lists every process, each serves /metrics."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import ROOT, Stack, wait_for

pytestmark = pytest.mark.integration

MOCK = {"name": "mock", "engine": "mock", "model": "mock", "replicas": 2,
        "engine_args": {"ttft_ms": 10, "itl_ms": 5, "tokens": 8}}
REQUESTS = 12


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    s = Stack(tmp, [MOCK], workers=2)
    config = yaml.safe_load(s.config_path.read_text())
    config["head"]["prometheus_sd_file"] = str(tmp / "sd" / "targets.json")
    s.config_path.write_text(yaml.safe_dump(config))
    s.sd_path = tmp / "sd" / "targets.json"
    s.start()
    yield s
    s.stop()


def sd_targets(stack) -> list[dict]:
    try:
        return json.loads(stack.sd_path.read_text())
    except (OSError, ValueError):
        return []


def by_role(targets: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for t in targets:
        out.setdefault(t["labels"]["role"], []).append(t)
    return out


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get("http://%s/metrics" % address, timeout=5)
    assert r.status_code == 200, (address, r.status_code)
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def stream_one(stack, i: int) -> int:
    body = {"model": "mock", "prompt": "metrics %d" % i, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", stack.base_url + "/v1/completions", json=body, timeout=10) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return resp.status_code


def complete_list(stack) -> dict[str, list[dict]]:
    roles = by_role(sd_targets(stack))
    ok = (len(roles.get("head", [])) == 1 and len(roles.get("agent", [])) == 1
          and len(roles.get("replica", [])) == 2 and len(roles.get("proxy", [])) == 1)
    return roles if ok else {}


def test_sd_file_lists_every_process_and_each_serves_sane_metrics(stack):
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda i: stream_one(stack, i), range(REQUESTS))) == [200] * REQUESTS
    roles = wait_for(lambda: complete_list(stack), 10.0, "head, agent, 2 replicas and the proxy in the SD file")
    assert roles["proxy"][0]["targets"] == [stack.base_url.split("//")[1]]
    assert {t["labels"]["replica"] for t in roles["replica"]} == {r["replica_id"] for r in stack.replicas("mock")}
    assert all(t["labels"]["deployment"] == "mock" and t["labels"]["host"] == "127.0.0.1" for t in roles["replica"])

    def proxy_done():  # a request is counted when its body closes, just after the client read [DONE]
        s = scrape(roles["proxy"][0]["targets"][0])
        done = s.get(("tokenrelay_proxy_requests_total", (("deployment", "mock"), ("status", "200"))), 0)
        return s if done >= REQUESTS and value(s, "tokenrelay_proxy_in_flight_requests", deployment="mock") == 0 \
            else None

    proxy = wait_for(proxy_done, 5.0, "the proxy to count every request")
    assert value(proxy, "tokenrelay_proxy_time_to_first_token_seconds_count", deployment="mock") >= REQUESTS
    assert value(proxy, "tokenrelay_proxy_inter_token_latency_seconds_count", deployment="mock") >= REQUESTS * 7
    assert value(proxy, "tokenrelay_proxy_request_duration_seconds_count", deployment="mock") >= REQUESTS
    assert 0 <= value(proxy, "tokenrelay_proxy_routing_table_age_seconds") < 3
    assert value(proxy, "tokenrelay_proxy_routing_table_replicas", deployment="mock") == 2  # both workers
    # all but the first and the last token of each stream went straight from the replica reader to the client
    direct = value(proxy, "tokenrelay_proxy_direct_chunks_total", deployment="mock")
    assert REQUESTS * 3 <= direct < REQUESTS * 8
    cpu = {labels: v for (name, labels), v in proxy.items() if name == "tokenrelay_proxy_cpu_seconds_total"}
    cpu_roles = sorted(dict(labels)["role"] for labels in cpu)
    assert cpu_roles == ["master", "worker", "worker"] and all(v > 0 for v in cpu.values())  # two workers

    def replicas_caught_up():  # the status a replica's metrics read is at most 250 ms old
        scraped = [scrape(t["targets"][0]) for t in roles["replica"]]
        done = sum(total(s, "tokenrelay_replica_requests_total") for s in scraped)
        return scraped if done >= REQUESTS else None

    replicas = wait_for(replicas_caught_up, 5.0, "replica counters to include the traffic")
    assert sum(value(s, "tokenrelay_replica_generated_tokens_total") for s in replicas) >= REQUESTS * 8
    for s, t in zip(replicas, roles["replica"], strict=True):
        assert value(s, "tokenrelay_replica_ready") == 1
        assert value(s, "tokenrelay_replica_info", replica=t["labels"]["replica"], engine="mock", model="mock") == 1
        assert value(s, "tokenrelay_replica_running_requests") == 0
        assert value(s, "tokenrelay_replica_engine_errors_total", kind="fatal") == 0
        assert value(s, "tokenrelay_replica_connected_proxies") <= 2
        assert total(s, "process_resident_memory_bytes") > 0  # the default registry is served too
    assert sum(value(s, "tokenrelay_replica_connected_proxies") for s in replicas) >= 1  # the workers that sent
    batches = sum(value(s, "tokenrelay_replica_token_batches_total") for s in replicas)
    tokens = sum(value(s, "tokenrelay_replica_generated_tokens_total") for s in replicas)
    assert 0 < batches <= tokens

    agent = wait_for(lambda: (lambda s: s if total(s, "tokenrelay_agent_replica_cpu_seconds_total") > 0 else None)(
        scrape(roles["agent"][0]["targets"][0])), 5.0, "the agent to sample its replicas")
    assert value(agent, "tokenrelay_agent_replicas", state="ready") == 2
    assert value(agent, "tokenrelay_agent_head_connected") == 1
    for t in roles["replica"]:
        key = dict(replica=t["labels"]["replica"], deployment="mock")
        assert value(agent, "tokenrelay_agent_replica_state", state="ready", **key) == 1
        assert value(agent, "tokenrelay_agent_replica_resident_memory_bytes", **key) > 10 * 2**20
        assert value(agent, "tokenrelay_agent_replica_processes", **key) >= 1

    head = scrape(roles["head"][0]["targets"][0])
    assert value(head, "tokenrelay_head_deployments") == 1
    assert value(head, "tokenrelay_head_deployment_desired_replicas", deployment="mock") == 2
    assert value(head, "tokenrelay_head_deployment_ready_replicas", deployment="mock") == 2
    assert value(head, "tokenrelay_head_replicas", deployment="mock", state="ready") == 2
    assert value(head, "tokenrelay_head_agents") == 1
    assert value(head, "tokenrelay_head_discovery_targets", role="replica") == 2
    assert value(head, "tokenrelay_head_reconcile_duration_seconds_count") > 0
    assert value(head, "tokenrelay_head_routing_table_version") >= 1


def test_status_shows_cpu_and_memory(stack):
    def usage_known():
        st = stack.status()
        reps = st["deployments"]["mock"]["replica_list"]
        return st if all(r["rss_bytes"] > 0 for r in reps) and st["agents"][0]["rss_bytes"] > 0 else None

    st = wait_for(usage_known, 5.0, "resource use in the status")
    assert all(r["metrics_endpoint"].startswith("127.0.0.1:") for r in st["deployments"]["mock"]["replica_list"])
    out = subprocess.run([sys.executable, "-m", "runtime", "status", "--head", stack.head, "--state-dir",
                          str(stack.state_dir)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("rss=") == 3 and "cpu=" in out.stdout  # two replicas and the agent


def test_a_restarted_replica_is_listed_at_its_new_port(stack):
    roles = wait_for(lambda: complete_list(stack), 10.0, "a complete SD file")
    victim = roles["replica"][0]
    replica_id, old = victim["labels"]["replica"], victim["targets"][0]
    pid = next(r["pid"] for r in stack.replicas("mock") if r["replica_id"] == replica_id)
    os.kill(pid, signal.SIGKILL)

    def moved():
        now = {t["labels"]["replica"]: t["targets"][0] for t in by_role(sd_targets(stack)).get("replica", [])}
        return now if now.get(replica_id) not in (None, old) else None

    now = wait_for(moved, 15.0, "the restarted replica's new metrics port in the SD file")
    assert old not in now.values()
    assert scrape(now[replica_id])[("tokenrelay_replica_ready", ())] in (0.0, 1.0)
    agent = scrape(roles["agent"][0]["targets"][0])
    wait_for(lambda: value(scrape(roles["agent"][0]["targets"][0]), "tokenrelay_agent_replica_restarts_total",
                           replica=replica_id, deployment="mock") >= 1, 5.0, "the restart to be counted")
    assert agent  # scraped while the replica restarted: the agent kept serving


@pytest.mark.vllm
def test_vllm_replica_serves_vllm_metrics_next_to_ours(tmp_path):
    """A vLLM replica's endpoint also carries vLLM's own `vllm:*` metrics (the default registry)."""
    pytest.importorskip("vllm")
    from tests.tiny_model import build_tiny_model
    from tests.integration.stack import free_port

    # vLLM's IPC socket paths must fit in 107 bytes: pytest's tmp_path can be too deep for that
    root = Path(tempfile.mkdtemp(prefix="trv-", dir="/tmp"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_CACHE_ROOT=str(root / "cache"), TMPDIR=str(root / "tmp"),
               VLLM_RPC_BASE_PATH=str(root / "rpc"), VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    for sub in ("cache", "tmp", "rpc"):
        (root / sub).mkdir(parents=True)
    model = build_tiny_model(root / "tiny-llama")
    port = free_port()
    log = open(tmp_path / "replica.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "model_proc", "--replica-id", "v1", "--engine", "vllm",
                             "--model", str(model), "--engine-args", json.dumps({"max_model_len": 256}),
                             "--metrics-port", str(port), "--insecure"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError("the replica exited with %s: %s" % (
                    proc.returncode, (tmp_path / "replica.log").read_text()[-3000:]))
            try:
                s = scrape("127.0.0.1:%d" % port)
            except httpx.HTTPError:
                return None
            return s if s.get(("tokenrelay_replica_ready", ())) == 1 else None

        s = wait_for(ready, 180.0, "the vLLM replica to be ready")
        assert value(s, "tokenrelay_replica_info", replica="v1", engine="vllm", model=str(model)) == 1
        names = {name for name, _ in s}
        assert "vllm:num_requests_running" in names and "vllm:kv_cache_usage_perc" in names, sorted(names)[:50]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
        log.close()
