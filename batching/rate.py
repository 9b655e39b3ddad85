"""Arrival-rate estimate: an EWMA of the per-tick rate, that also decays while nothing arrives."""

from __future__ import annotations


class ArrivalRate:
    """Arrivals per second, smoothed over ticks of at least ``tick_secs`` seconds.

    The batcher counts records, not items (``observe(now, size)``), so the rate is records/s.
    """

    def __init__(self, *, tick_secs: float = 0.01, alpha: float = 0.3, start: float = 0.0) -> None:
        if tick_secs <= 0 or not 0 < alpha <= 1:
            raise ValueError("need tick_secs > 0 and 0 < alpha <= 1")
        self.tick_secs = tick_secs
        self.alpha = alpha
        self._rate = 0.0
        self._count = 0
        self._tick_start = start

    def observe(self, now: float, count: int = 1) -> None:
        """Record ``count`` arrivals at ``now``."""
        self._close_tick(now)
        self._count += count

    def per_sec(self, now: float) -> float:
        """The current estimate; a quiet spell longer than a tick pulls it toward zero."""
        self._close_tick(now)
        return self._rate

    def _close_tick(self, now: float) -> None:
        elapsed = now - self._tick_start
        if elapsed < self.tick_secs:
            return
        instant = self._count / elapsed
        self._rate = instant if self._rate == 0.0 else (1 - self.alpha) * self._rate + self.alpha * instant
        self._count = 0
        self._tick_start = now
