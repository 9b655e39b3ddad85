"""A retry budget: retries allowed as a fraction of recent requests, plus a small floor.

A token bucket whose tokens expire: every request deposits ``ratio`` tokens, every retry withdraws
one, and both are forgotten after ``ttl_secs``. A floor of ``min_retries_per_sec`` x ``ttl_secs``
tokens lets a quiet gateway still retry. So over any ``ttl_secs`` window:

    retries <= min_retries_per_sec * ttl_secs + ratio * requests

This is Finagle's ``RetryBudget`` (defaults 20 % and 10/s over 10 s; Envoy's budget is also 20 %).
Why a budget at all: when every endpoint is failing, unbounded retries multiply the load exactly when
there is least capacity; the budget caps the extra load at ``ratio`` while single failures still get
their retry. Time comes from an injected clock; the window is kept in ``slots`` buckets, so memory is
constant whatever the request rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RetryBudget:
    """Decides whether one more retry is affordable. Use it from one event loop."""

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_retries_per_sec: float = 10.0,
        ttl_secs: float = 10.0,
        slots: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_retries_per_sec < 0:
            raise ValueError("ratio and min_retries_per_sec must be >= 0")
        if ttl_secs <= 0 or slots < 1:
            raise ValueError("ttl_secs must be > 0 and slots >= 1")
        self.ratio = ratio
        self.reserve = min_retries_per_sec * ttl_secs
        self._slot_secs = ttl_secs / slots
        self._slots = slots
        self._clock = clock
        # Ring of [slot number, requests, retries]; a slot number older than the window is stale.
        # Counts stay integers so that 100 requests at 20 % make exactly 20 retries.
        self._ring = [[-1, 0, 0] for _ in range(slots)]

    def _current(self) -> list:
        number = math.floor(self._clock() / self._slot_secs)
        cell = self._ring[number % self._slots]
        if cell[0] != number:
            cell[0], cell[1], cell[2] = number, 0, 0
        return cell

    def _totals(self) -> tuple[int, int]:
        newest = math.floor(self._clock() / self._slot_secs)
        requests, retries = 0, 0
        for number, slot_requests, slot_retries in self._ring:
            if newest - self._slots < number <= newest:
                requests += slot_requests
                retries += slot_retries
        return requests, retries

    def record_request(self) -> None:
        """Count one original request (not a retry): it earns ``ratio`` of a retry."""
        self._current()[1] += 1

    def balance(self) -> float:
        """Retries affordable now (may be fractional)."""
        requests, retries = self._totals()
        return self.reserve + self.ratio * requests - retries

    def try_withdraw(self) -> bool:
        """Take one retry if the budget allows it; False means: do not retry."""
        if self.balance() < 1.0 - 1e-9:  # tolerate rounding in ratio * requests
            return False
        self._current()[2] += 1
        return True
