"""Time to first token over a sliding window: what a replica reports in ReplicaStatus.ttft_p90_s.

Pure logic, no sockets, no clock of its own (callers pass `now`); runs in model_proc's asyncio loop.
The head's autoscaler scales up on it (autoscaling.target_ttft_p90_s, head.autoscaler). Bounded: at most
`max_samples` samples are kept (the newest), so a flood of requests cannot grow it.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

WINDOW_S = 10.0  # seconds of first tokens a p90 covers


class TtftWindow:
    def __init__(self, window_s: float = WINDOW_S, max_samples: int = 4096) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (at, ttft seconds)

    def observe(self, now: float, ttft_s: float) -> None:
        self._samples.append((now, max(0.0, ttft_s)))

    def p90(self, now: float) -> Optional[float]:
        """The 90th percentile (nearest rank) of the first tokens of the last `window_s`; None if none."""
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        if not self._samples:
            return None
        values = sorted(t for _, t in self._samples)
        return values[max(0, -(-9 * len(values) // 10) - 1)]
