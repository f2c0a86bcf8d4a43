"""proxy.replica_pool.ReplicaPool.sync with real (unconnected) sockets: a routing-table row whose endpoint
libzmq refuses costs that replica only."""
from __future__ import annotations

import logging

import zmq.green as zmq_green

from proxy.replica_pool import ReplicaPool
from runtime.protocol import DeploymentRoute, ReplicaRoute, RoutingTable


def _table(version: int, rows: dict[str, list[tuple[str, str]]]) -> RoutingTable:
    return RoutingTable(1, version, 0.0, [
        DeploymentRoute(name, "mock", "m", [ReplicaRoute(rid, ep, 0, 0, 0.0, 8) for rid, ep in replicas])
        for name, replicas in rows.items()])


def test_a_replica_with_an_endpoint_libzmq_refuses_costs_only_that_replica(caplog):
    """Before, the ZMQError of its connect ended `sync`: every replica after it in the table, of every
    deployment, got no connection in this worker until the table changed (and then again)."""
    ctx = zmq_green.Context()
    pool = ReplicaPool(ctx, b"proxy-test-1-secret", 1000)
    rows = {"a": [("bad", "tcp://no-port"), ("a1", "tcp://127.0.0.1:1")], "b": [("b1", "tcp://127.0.0.1:2")]}
    try:
        with caplog.at_level(logging.ERROR, logger="proxy.replica_pool"):
            pool.sync(_table(1, rows))
            pool.sync(_table(2, rows))  # the same row again: not logged again
        assert sorted(pool.replica_ids()) == ["a1", "b1"]
        assert [c.replica_id for c in pool.connections("a")] == ["a1"]
        refusals = [r for r in caplog.records if "cannot connect to 'tcp://no-port'" in r.getMessage()]
        assert len(refusals) == 1 and "bad" in refusals[0].getMessage()
    finally:
        pool.close_all()
        ctx.destroy(linger=0)
