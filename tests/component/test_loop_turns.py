"""proxy.loop_turns.LoopTurns in a real gevent loop: a greenlet with ready work that takes its turns
lets timers and I/O of the others run within about POLL_EVERY; gevent.sleep(0) alone did not."""
from __future__ import annotations

import time
from typing import Callable

import gevent

from proxy.loop_turns import LoopTurns


def lateness_while_busy(yield_turn: Callable[[], None]) -> float:
    """The longest a 10 ms ticker greenlet is late while another works 0.4 s in 5 ms steps."""
    late: list[float] = []
    done = False

    def ticker() -> None:
        while not done:
            start = time.monotonic()
            gevent.sleep(0.01)
            late.append(time.monotonic() - start - 0.01)

    def busy() -> None:
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            step = time.monotonic()
            while time.monotonic() - step < 0.005:
                pass
            yield_turn()

    tick = gevent.spawn(ticker)
    gevent.sleep(0.02)
    gevent.spawn(busy).join()
    done = True
    tick.join(1)
    return max(late)


def test_a_busy_greenlet_taking_turns_lets_the_loop_run_every_few_ms() -> None:
    assert lateness_while_busy(LoopTurns().take) < 0.05


def test_gevent_sleep_0_alone_starves_the_loop() -> None:
    """Why LoopTurns exists: gevent polls (and runs timers) once per 50 callbacks, 50 x 5 ms here."""
    assert lateness_while_busy(lambda: gevent.sleep(0)) > 0.15
