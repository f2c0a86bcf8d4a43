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
