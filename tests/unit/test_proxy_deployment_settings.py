"""Unit tests for the per-deployment proxy settings: `routing` and `timeouts` in a deployment spec
(runtime.stack_config), how they travel in the routing table, and the wire compatibility of the
fields the proxy added to runtime.protocol (DeploymentRoute.routing/timeouts, TokenBatch.load)."""
from __future__ import annotations

import msgspec
import pytest

from runtime import protocol as p
from runtime.stack_config import parse_deployment

BASE = {"name": "m", "engine": "mock"}


def test_defaults_when_absent_and_round_trip_through_to_dict() -> None:
    spec = parse_deployment(BASE)
    assert spec.routing == p.RoutingSettings() and spec.timeouts == p.TimeoutSettings()
    raw = dict(BASE, routing={"policy": "prefix", "prefix_chars": 64, "max_imbalance": 3, "queue_size": 0,
                              "queue_timeout_s": 0.5, "session_affinity": False},
               timeouts={"first_token_s": 5, "idle_s": 2.5, "total_s": None})
    spec = parse_deployment(raw)
    assert spec.routing == p.RoutingSettings("prefix", 64, 3, False, 0, 0.5)
    assert spec.timeouts == p.TimeoutSettings(5.0, 2.5, None)
    assert parse_deployment(spec.to_dict()) == spec  # the head stores to_dict() and parses it back


@pytest.mark.parametrize("raw, message", [
    ({"routing": {"policy": "random"}}, "routing.policy: must be one of p2c, prefix"),
    ({"routing": {"prefix_chars": 0}}, "routing.prefix_chars: must be an integer >= 1"),
    ({"routing": {"queue_size": -1}}, "routing.queue_size: must be an integer >= 0"),
    ({"routing": {"queue_timeout_s": "soon"}}, "routing.queue_timeout_s: must be a number >= 0"),
    ({"routing": {"session_affinity": "yes"}}, "routing.session_affinity: must be true or false"),
    ({"routing": {"colour": "red"}}, "routing: unknown field(s) ['colour']"),
    ({"routing": "p2c"}, "routing: must be a mapping"),
    ({"timeouts": {"first_token_s": 0}}, "timeouts.first_token_s: must be a number > 0"),
    ({"timeouts": {"idle_s": -3}}, "timeouts.idle_s: must be a number >= 0"),
    ({"timeouts": {"ttft": 3}}, "timeouts: unknown field(s) ['ttft']"),
])
def test_bad_settings_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_deployment(dict(BASE, **raw), "deployments[0]")
    assert message in str(info.value) and "deployments[0]." in str(info.value)


class OldDeploymentRoute(msgspec.Struct, frozen=True):  # the shape before routing/timeouts existed
    name: str
    engine: str
    model: str
    replicas: list[p.ReplicaRoute]


class OldTokenBatch(msgspec.Struct, frozen=True, array_like=True):
    deltas: list[p.Delta]


def test_new_fields_are_wire_compatible_both_ways() -> None:
    new = p.DeploymentRoute("m", "mock", "mock", [], p.RoutingSettings(policy="prefix"), p.TimeoutSettings(1.0))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=OldDeploymentRoute).name == "m"
    old = msgspec.msgpack.encode(OldDeploymentRoute("m", "mock", "mock", []))
    assert msgspec.msgpack.decode(old, type=p.DeploymentRoute).routing == p.RoutingSettings()
    batch = p.TokenBatch([p.Delta("r", "a", None, 1, 1)], load=7)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(batch), type=OldTokenBatch).deltas == batch.deltas
    legacy = msgspec.msgpack.encode(OldTokenBatch([]))
    assert msgspec.msgpack.decode(legacy, type=p.TokenBatch).load is None


def test_the_head_puts_the_settings_in_the_routing_table() -> None:
    from head.cluster import ClusterState

    spec = parse_deployment(dict(BASE, routing={"policy": "prefix", "queue_size": 3},
                                 timeouts={"total_s": 30}))
    (route,) = ClusterState([spec]).routes()
    assert route.routing.policy == "prefix" and route.routing.queue_size == 3
    assert route.timeouts.total_s == 30.0
