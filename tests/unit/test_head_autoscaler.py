"""head.autoscaler with a fake clock: steady, step up, step down, flapping, capacity, failures."""
from __future__ import annotations

from head.autoscaler import Autoscaler, AutoscalingConfig

CFG = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=8,
                        upscale_delay_s=5, downscale_delay_s=30)


def _run(scaler, replicas, load, start, end, step=1.0, **kw):
    """Drive the scaler each `step` seconds; the replicas it asks for are ready at once."""
    t = start
    while t <= end:
        d = scaler.decide(t, replicas, load, replicas, 0, **kw)
        replicas = d.replicas
        t += step
    return replicas, d


def test_steady_load_keeps_the_count():
    s = Autoscaler(CFG)
    replicas, d = _run(s, 2, 12, 0, 300)
    assert replicas == 2 and d.reason.startswith("steady: 12 ongoing on 2 ready")


def test_step_up_waits_the_upscale_delay_then_jumps_to_what_the_load_needs():
    s = Autoscaler(CFG)
    assert s.decide(0, 1, 30, 1, 0).replicas == 1
    d = s.decide(4, 1, 30, 1, 0)
    assert d.replicas == 1 and d.wanted == 4 and d.reason.startswith("up to 4 in 1s")
    d = s.decide(5, 1, 30, 1, 0)
    assert d.replicas == 4 and d.reason.startswith("scaled up")
    # and a load beyond max_replicas is clamped
    assert Autoscaler(CFG).decide(0, 4, 400, 4, 0).wanted == 4


def test_step_down_waits_the_longer_downscale_delay_and_never_below_min():
    s = Autoscaler(CFG)
    replicas, _ = _run(s, 4, 0, 0, 29)
    assert replicas == 4
    d = s.decide(30, 4, 0, 4, 0)
    assert d.replicas == 1 and d.reason.startswith("scaled down")


def test_flapping_load_never_scales_down_and_short_bursts_never_up():
    s = Autoscaler(CFG)
    replicas = 2
    for t in range(0, 600):
        load = 16 if (t // 10) % 2 == 0 else 2  # 10 s on, 10 s off: below target half the time
        d = s.decide(float(t), replicas, load, replicas, 0)
        replicas = d.replicas
        assert replicas == 2, (t, d)
    s = Autoscaler(CFG)
    for t in range(0, 100):
        burst = 40 if t % 8 < 3 else 8  # 3 s bursts, shorter than the upscale delay
        assert s.decide(float(t), 1, burst, 1, 0).replicas == 1


def test_capacity_caps_the_step_and_says_so():
    s = Autoscaler(CFG)
    fits = lambda n: n <= 2  # noqa: E731 - two replicas fit on the agents
    s.decide(0, 1, 32, 1, 0, fits=fits)
    d = s.decide(5, 1, 32, 1, 0, fits=fits)
    assert d.replicas == 2 and "2 of 4 wanted (capacity)" in d.reason
    d = s.decide(6, 2, 32, 2, 0, fits=fits)
    assert d.replicas == 2 and d.reason.startswith("capacity: 4 wanted, no room for more")


def test_failing_or_starting_replicas_hold_the_count():
    s = Autoscaler(CFG)
    s.decide(0, 1, 32, 1, 0)
    d = s.decide(10, 1, 32, 0, 0, failing=True)
    assert d.replicas == 1 and d.reason.startswith("holding: replicas are failing")
    d = s.decide(11, 2, 32, 1, 1)
    assert d.replicas == 2 and d.reason.startswith("holding: 1 replica(s) starting")
    s = Autoscaler(CFG)
    s.decide(0, 3, 0, 2, 1)
    assert s.decide(100, 3, 0, 2, 1).replicas == 3  # never down while one is starting


# ------------------------------------------------------------------ scale to zero (min_replicas 0)

ZERO = AutoscalingConfig(min_replicas=0, max_replicas=3, target_ongoing_requests=4,
                         upscale_delay_s=5, downscale_delay_s=30)


def test_scaled_to_zero_stays_there_without_demand():
    replicas, d = _run(Autoscaler(ZERO), 0, 0, 0, 120)
    assert replicas == 0 and d.reason.startswith("steady")


def test_requests_waiting_in_a_proxy_start_a_replica_at_once_not_after_the_upscale_delay():
    s = Autoscaler(ZERO)
    d = s.decide(0, 0, 0, 0, 0, waiting=1)
    assert d.replicas == 1 and "1 waiting for a replica" in d.reason
    # many waiting: as many replicas as the target asks for, at once
    assert Autoscaler(ZERO).decide(0, 0, 0, 0, 0, waiting=9).replicas == 3


def test_no_start_from_zero_while_replicas_fail_or_when_nothing_fits():
    assert Autoscaler(ZERO).decide(0, 0, 0, 0, 0, waiting=2, failing=True).replicas == 0
    d = Autoscaler(ZERO).decide(0, 0, 0, 0, 0, waiting=2, fits=lambda n: n == 0)
    assert d.replicas == 0 and d.reason.startswith("capacity")


def test_back_to_zero_after_the_downscale_delay_with_nothing_ongoing():
    s = Autoscaler(ZERO)
    assert s.decide(0, 1, 2, 1, 0).replicas == 1  # serving
    assert s.decide(10, 1, 0, 1, 0).replicas == 1  # idle from t=10
    assert s.decide(39, 1, 0, 1, 0).replicas == 1
    d = s.decide(40, 1, 0, 1, 0)
    assert d.replicas == 0 and d.reason.startswith("scaled down")


def test_a_request_during_the_downscale_delay_keeps_the_replica():
    s = Autoscaler(ZERO)
    s.decide(0, 1, 0, 1, 0)
    s.decide(29, 1, 1, 1, 0)  # one request ongoing just before the delay ends
    assert s.decide(31, 1, 0, 1, 0).replicas == 1  # the idle clock started over at 31
    assert s.decide(61, 1, 0, 1, 0).replicas == 0


# ------------------------------------------------------------------ TTFT p90 objective

SLO = AutoscalingConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=100,
                        upscale_delay_s=5, downscale_delay_s=30, target_ttft_p90_s=0.5)


def test_ttft_over_the_objective_scales_up_although_ongoing_is_under_target():
    s = Autoscaler(SLO)
    d = s.decide(0, 1, 4, 1, 0, ttft_p90=0.9)
    assert d.replicas == 1 and d.wanted == 2 and "TTFT p90 0.900s (objective 0.5s)" in d.reason
    assert s.decide(5, 1, 4, 1, 0, ttft_p90=0.9).replicas == 2
    # the new replica is starting: no second step yet
    assert s.decide(6, 2, 4, 1, 1, ttft_p90=0.9).replicas == 2


def test_ttft_under_the_objective_or_unknown_changes_nothing():
    replicas, d = _run(Autoscaler(SLO), 1, 4, 0, 60, ttft_p90=0.3)
    assert replicas == 1
    replicas, d = _run(Autoscaler(SLO), 1, 4, 0, 60, ttft_p90=None)
    assert replicas == 1
    # without an objective, a slow TTFT alone scales nothing
    replicas, d = _run(Autoscaler(CFG), 1, 4, 0, 60, ttft_p90=5.0)
    assert replicas == 1


def test_ttft_objective_holds_a_scale_down_and_respects_max():
    s = Autoscaler(SLO)
    replicas, _ = _run(s, 2, 0, 0, 120, ttft_p90=0.8)  # no load to speak of but slow: up, never down
    assert replicas == 3
    replicas, d = _run(Autoscaler(SLO), 3, 0, 0, 120, ttft_p90=0.8)
    assert replicas == 3 and d.wanted == 3


def test_a_brief_ttft_spike_shorter_than_the_upscale_delay_scales_nothing():
    s = Autoscaler(SLO)
    assert s.decide(0, 1, 4, 1, 0, ttft_p90=0.9).replicas == 1
    assert s.decide(3, 1, 4, 1, 0, ttft_p90=0.2).replicas == 1
    assert s.decide(6, 1, 4, 1, 0, ttft_p90=0.2).replicas == 1
