"""tokenrelay_proxy_routing_table_replicas: what a worker's routing table holds per deployment, set on
every applied table; a deployment that left the table reads 0 instead of its last count."""
from __future__ import annotations

from prometheus_client import REGISTRY

from proxy import metrics


def replicas(deployment: str):
    return REGISTRY.get_sample_value("tokenrelay_proxy_routing_table_replicas", {"deployment": deployment})


def test_each_applied_table_sets_the_count_and_a_deployment_that_left_reads_zero():
    metrics.table_applied({"tbl-a": 2, "tbl-b": 1})
    assert (replicas("tbl-a"), replicas("tbl-b")) == (2, 1)
    metrics.table_applied({"tbl-a": 3})
    assert (replicas("tbl-a"), replicas("tbl-b")) == (3, 0)
    metrics.table_applied({"tbl-a": 0, "tbl-b": 2})  # it came back
    assert (replicas("tbl-a"), replicas("tbl-b")) == (0, 2)
