"""model_proc.ttft_window: the TTFT p90 a replica reports for the autoscaler, with a fake clock."""
import pytest

from model_proc.ttft_window import TtftWindow

pytestmark = pytest.mark.unit


def test_no_first_token_in_the_window_is_none():
    w = TtftWindow(window_s=10)
    assert w.p90(0.0) is None
    w.observe(0.0, 0.2)
    assert w.p90(5.0) == 0.2
    assert w.p90(10.5) is None  # older than the window: forgotten


def test_p90_is_the_nearest_rank_of_the_window():
    w = TtftWindow(window_s=10)
    for i in range(1, 11):  # 0.1 .. 1.0 s
        w.observe(float(i) / 10, i / 10)
    assert w.p90(2.0) == pytest.approx(0.9)
    # slow first tokens a while ago leave the window; the recent fast ones remain
    for _ in range(20):
        w.observe(12.0, 0.05)
    assert w.p90(12.0) == pytest.approx(0.05)


def test_samples_are_bounded():
    w = TtftWindow(window_s=10, max_samples=100)
    for i in range(1000):
        w.observe(0.0, 1.0 if i < 900 else 0.01)
    assert w.p90(0.0) == 0.01  # only the newest 100 are kept
