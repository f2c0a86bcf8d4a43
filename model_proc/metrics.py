"""Every prometheus metric of a replica (prefix `tokenrelay_replica_`), read from the server at scrape time.

Runs in model_proc. Owns no socket itself: `start` opens the /metrics listener through runtime.metrics_http
(an exporter thread that only renders). The metrics cost nothing on the token path: `ReplicaCollector`
reads, at scrape time, the last ReplicaStatus the server's loop built for its agent heartbeat (an
immutable struct, at most one status interval old) and a few plain ints. It must never call the engine
from the exporter thread (vLLM's `stats()` may declare the engine dead, which sends on sockets). The
endpoint also serves prometheus-client's default registry, where vLLM registers its own `vllm:*` metrics
(and `process_*` / `python_*` live).

  name                                          type     labels   meaning
  tokenrelay_replica_info                       gauge    replica, engine, model   always 1
  tokenrelay_replica_ready                      gauge             1 once the engine produced a token and
                                                                  while not draining
  tokenrelay_replica_running_requests           gauge             requests the engine is generating
  tokenrelay_replica_waiting_requests           gauge             requests queued in the engine
  tokenrelay_replica_kv_cache_usage_ratio       gauge             KV cache in use, 0-1
  tokenrelay_replica_in_flight_requests         gauge             requests routed here and not ended
  tokenrelay_replica_connected_proxies          gauge             proxy workers that sent a request
  tokenrelay_replica_generated_tokens_total     counter           completion tokens produced
  tokenrelay_replica_requests_total             counter  outcome  ended requests: finished | aborted
  tokenrelay_replica_engine_errors_total        counter  kind     request (one request failed) |
                                                                  fatal (the engine died)
  tokenrelay_replica_engine_steps_total         counter           loop iterations that flushed tokens
  tokenrelay_replica_token_batches_total        counter           TokenBatch messages with tokens sent
  tokenrelay_replica_auth_refused_total         counter  role, reason   data-socket connections refused
                                                                  (not a proxy key, unknown, revoked)
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime import metrics_http

PREFIX = "tokenrelay_replica_"
# counted from the ZAP thread (runtime.zap); one per process, served by every registry `start` builds
AUTH_REFUSED = Counter(PREFIX + "auth_refused", "Connections to the data socket refused by CURVE "
                       "authentication or authorisation", ["role", "reason"], registry=None)
DEAD_EXIT_CODE = 4  # model_proc.config.EXIT_ENGINE_DIED (not imported: keep this module dependency-free)


class ReplicaCollector(Collector):
    """Reads a ReplicaServer's counters and its engine's stats. `server` needs the attributes used below."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def collect(self) -> Iterator[Any]:
        s = self._server
        cfg = s.config
        info = GaugeMetricFamily(PREFIX + "info", "Constant 1: which replica, engine and model this is",
                                 labels=["replica", "engine", "model"])
        info.add_metric([cfg.replica_id, cfg.engine, cfg.model], 1)
        yield info
        st = getattr(s, "last_status", None)
        if st is None:  # the loop has not built a status yet
            return
        yield GaugeMetricFamily(PREFIX + "ready", "1 while the engine is ready and the replica not draining",
                                value=1 if st.ready else 0)
        yield GaugeMetricFamily(PREFIX + "running_requests", "Requests the engine is generating",
                                value=st.running)
        yield GaugeMetricFamily(PREFIX + "waiting_requests", "Requests queued in the engine", value=st.waiting)
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_ratio", "KV cache in use (0-1)",
                                value=st.kv_cache_usage)
        yield GaugeMetricFamily(PREFIX + "in_flight_requests", "Requests routed to this replica, not ended",
                                value=s.in_flight)
        yield GaugeMetricFamily(PREFIX + "connected_proxies", "Proxy workers that sent this replica a request",
                                value=s.connected_proxies)
        yield CounterMetricFamily(PREFIX + "generated_tokens", "Completion tokens produced",
                                  value=st.tokens_generated)
        requests = CounterMetricFamily(PREFIX + "requests", "Requests that ended, by outcome",
                                       labels=["outcome"])
        requests.add_metric(["finished"], st.requests_finished)
        requests.add_metric(["aborted"], st.requests_aborted)
        yield requests
        errors = CounterMetricFamily(PREFIX + "engine_errors",
                                     "Engine errors: a request failed (request) or the engine died (fatal)",
                                     labels=["kind"])
        errors.add_metric(["request"], st.errors)
        errors.add_metric(["fatal"], 1 if getattr(s, "_exit_code", 0) == DEAD_EXIT_CODE else 0)
        yield errors
        yield CounterMetricFamily(PREFIX + "engine_steps", "Loop iterations that flushed tokens to proxies",
                                  value=st.steps)
        yield CounterMetricFamily(PREFIX + "token_batches", "TokenBatch messages with tokens sent to proxies",
                                  value=getattr(s, "batches_sent", 0))


def start(server: Any, host: str, port: int) -> Optional[metrics_http.MetricsServer]:
    """Serve this replica's metrics (and the default registry's) on host:port; None when port < 0."""
    registry: CollectorRegistry = metrics_http.registry_with_defaults()
    registry.register(ReplicaCollector(server))
    registry.register(AUTH_REFUSED)
    return metrics_http.serve(registry, host, port)
