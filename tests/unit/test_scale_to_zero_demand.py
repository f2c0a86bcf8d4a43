"""Scale to zero without sockets: the proxy worker's gateway holds requests for a deployment with no
replica and tells the head at most once a second; the head's autoscaler starts a replica on that demand
and forgets it when it stops (fake clocks throughout)."""
from __future__ import annotations

import pytest

from head.config import HeadConfig
from head.autoscaler import DEMAND_WINDOW
from head.server import Head
from head.store import StateStore
from proxy.config import ProxyConfig
from proxy.gateway import Gateway
from proxy.router import DOWN, NONE
from runtime.protocol import DeploymentRoute, RoutingTable, ScaleDemand, encode
from runtime.stack_config import AutoscalingConfig, DeploymentSpec

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class NoReplicas:
    def connections(self, deployment: str) -> list:
        return []


class Subscriber:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def note_demand(self, deployment: str, waiting: int) -> None:
        self.sent.append((deployment, waiting))


def _gateway(cold: float) -> tuple[Gateway, Clock, Subscriber]:
    clock = Clock()
    gw = Gateway(ProxyConfig.from_args(["--head", "tcp://127.0.0.1:1", "--insecure"]), clock=clock)
    gw.state.offer(RoutingTable(1, 1, 0.0, [DeploymentRoute("z", "mock", "m", [], cold_start_timeout_s=cold)]),
                   clock.now)
    sub = Subscriber()
    gw._pool, gw._sub = NoReplicas(), sub  # type: ignore[assignment]
    return gw, clock, sub


def test_a_request_for_a_scaled_to_zero_deployment_waits_the_cold_start_and_the_head_is_told_once_a_second():
    gw, clock, sub = _gateway(cold=45.0)
    assert gw.queue("z").timeout == 45.0  # not the 2 s queue timeout: a replica takes longer to start
    assert gw.choose("z", None, frozenset()).outcome == DOWN  # wait in the queue, not 503 at once
    for _ in range(3):  # the head of the queue retries every 0.25 s
        clock.now += 0.25
        assert gw.choose("z", None, frozenset()).outcome == DOWN
    assert sub.sent == [("z", 1)]
    clock.now += 0.25
    gw.choose("z", None, frozenset())
    assert sub.sent == [("z", 1), ("z", 1)]


def test_a_deployment_without_scale_to_zero_and_no_replica_is_refused_and_the_head_not_bothered():
    gw, clock, sub = _gateway(cold=0.0)
    assert gw.choose("z", None, frozenset()).outcome == NONE
    assert gw.queue("z").timeout == 2.0 and sub.sent == []


def _head(clock: Clock) -> Head:
    spec = DeploymentSpec("z", "mock", "m", replicas=0, autoscaling=AutoscalingConfig(
        min_replicas=0, max_replicas=2, target_ongoing_requests=4, downscale_delay_s=30))
    cfg = HeadConfig(control="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", recovery_grace=0.0,
                     metrics_port=-1)
    head = Head(cfg, StateStore(None), "tok", seed=(spec,), clock=clock)
    return head


def test_the_head_starts_a_replica_on_a_proxys_demand_at_once():
    clock = Clock()
    head = _head(clock)
    head._autoscale(clock.now)
    assert head.state.deployments["z"].replicas == 0  # no demand: stays at zero
    head._handle([b"proxy-1"] + encode(ScaleDemand("z", 3)))
    head._handle([b"proxy-1"] + encode(ScaleDemand("nope", 3)))  # unknown deployment: ignored
    head._autoscale(clock.now)
    assert head.state.deployments["z"].replicas == 1
    assert "3 waiting for a replica" in head.scalers["z"].last.reason


def test_demand_older_than_its_window_is_forgotten():
    clock = Clock()
    head = _head(clock)
    head._handle([b"proxy-1"] + encode(ScaleDemand("z", 2)))
    clock.now += DEMAND_WINDOW + 0.1
    head._autoscale(clock.now)
    assert head.state.deployments["z"].replicas == 0 and len(head.demand) == 0
