"""model_proc.metrics: the collector reads the server's last status, never the engine. No sockets."""
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from model_proc.config import EXIT_ENGINE_DIED, ReplicaConfig
from model_proc.metrics import DEAD_EXIT_CODE, ReplicaCollector
from runtime.protocol import ReplicaStatus


class ExplodingEngine:
    def stats(self):
        raise AssertionError("the exporter thread must not call the engine")


def samples(collector) -> dict:
    registry = CollectorRegistry()
    registry.register(collector)
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def server(**kw) -> SimpleNamespace:
    base = dict(config=ReplicaConfig("r1", "mock", "tiny"), engine=ExplodingEngine(), last_status=None,
                in_flight=2, connected_proxies=1, _exit_code=0, batches_sent=40)
    base.update(kw)
    return SimpleNamespace(**base)


def test_dead_exit_code_matches_the_config():
    assert DEAD_EXIT_CODE == EXIT_ENGINE_DIED


def test_before_the_first_status_only_info_is_reported():
    s = samples(ReplicaCollector(server()))
    assert s == {("tokenrelay_replica_info", (("engine", "mock"), ("model", "tiny"), ("replica", "r1"))): 1.0}


def test_status_counters_and_gauges():
    st = ReplicaStatus("r1", True, running=3, waiting=2, kv_cache_usage=0.25, steps=17, tokens_generated=120,
                       requests_finished=5, requests_aborted=1, errors=2)
    s = samples(ReplicaCollector(server(last_status=st)))
    assert s[("tokenrelay_replica_ready", ())] == 1
    assert s[("tokenrelay_replica_running_requests", ())] == 3
    assert s[("tokenrelay_replica_waiting_requests", ())] == 2
    assert s[("tokenrelay_replica_kv_cache_usage_ratio", ())] == 0.25
    assert s[("tokenrelay_replica_in_flight_requests", ())] == 2
    assert s[("tokenrelay_replica_connected_proxies", ())] == 1
    assert s[("tokenrelay_replica_generated_tokens_total", ())] == 120
    assert s[("tokenrelay_replica_requests_total", (("outcome", "finished"),))] == 5
    assert s[("tokenrelay_replica_requests_total", (("outcome", "aborted"),))] == 1
    assert s[("tokenrelay_replica_engine_errors_total", (("kind", "request"),))] == 2
    assert s[("tokenrelay_replica_engine_errors_total", (("kind", "fatal"),))] == 0
    assert s[("tokenrelay_replica_engine_steps_total", ())] == 17
    assert s[("tokenrelay_replica_token_batches_total", ())] == 40


def test_a_dead_engine_counts_one_fatal_error():
    st = ReplicaStatus("r1", False, 0, 0, 0.0, 0, 0, 0, 0, 0)
    s = samples(ReplicaCollector(server(last_status=st, _exit_code=EXIT_ENGINE_DIED)))
    assert s[("tokenrelay_replica_engine_errors_total", (("kind", "fatal"),))] == 1
    assert s[("tokenrelay_replica_ready", ())] == 0
