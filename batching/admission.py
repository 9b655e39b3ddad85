"""Admission: refuse at once an item that the queue ahead of it would make late.

Under overload a record that waits in the queue only to be deferred at its deadline costs as much
work as one that is scored: the work of queueing, ordering and resolving it. When that work is the
bottleneck (an in-process model, or a busy event loop) the deferred records crowd out the scored
ones and goodput collapses. So the batcher refuses a new item when its remaining budget cannot
cover what recent items really waited, plus the dispatch lag and the call:

    refuse if  deadline - now  <  floor + lag + S_q(b)

``floor`` is the smallest queueing delay (enqueue to dispatch) of the batches sent in the last one
to two windows (a ``WindowedExtreme``): the standing queue, as CoDel measures it (RFC 8289); a burst
that drains quickly leaves it near zero, so bursts are not refused. With no batch sent recently it is
0 (nothing is known: admit). ``lag`` is the event loop's delay between deciding to send and the call
starting. See docs/batching.md §3.4 and §3.5.
"""

from __future__ import annotations

import math

# Window of the standing-queue minimum (CoDel's interval is 100 ms).
FLOOR_WINDOW_S = 0.1


class WindowedExtreme:
    """The smallest (or largest) value observed over the last one to two windows; ``empty`` when none was."""

    def __init__(self, window_secs: float = FLOOR_WINDOW_S, *, largest: bool = False, empty: float = 0.0) -> None:
        if window_secs <= 0:
            raise ValueError("window_secs must be > 0")
        self.window_secs = window_secs
        self._pick = max if largest else min
        self._empty = empty
        self._start = -math.inf
        self._current: float | None = None
        self._previous: float | None = None

    def observe(self, now: float, value: float) -> None:
        if now >= self._start + self.window_secs:
            # A window with nothing observed in between says nothing about now.
            self._previous = self._current if now < self._start + 2 * self.window_secs else None
            self._current = value
            self._start = now
        else:
            self._current = self._pick(self._current, value)

    def value(self, now: float) -> float:
        if self._current is None or now >= self._start + 2 * self.window_secs:
            return self._empty
        return self._current if self._previous is None else self._pick(self._current, self._previous)

    def stale(self, now: float) -> bool:
        """Whether the current window is over: the next observation starts a new one."""
        return now >= self._start + self.window_secs


class LagEstimate:
    """The typical delay between deciding to send a batch and its call starting (an EWMA).

    With no batch sent for two windows the loop is not busy with our calls, so it reads 0: an
    estimate left high by a stall must not keep refusing work that would bring it down.
    """

    def __init__(self, alpha: float = 0.2, window_secs: float = FLOOR_WINDOW_S) -> None:
        self.alpha = alpha
        self.window_secs = window_secs
        self._value = 0.0
        self._last = -math.inf

    def observe(self, now: float, lag_secs: float) -> None:
        if now - self._last >= 2 * self.window_secs:
            self._value = lag_secs
        else:
            self._value += self.alpha * (lag_secs - self._value)
        self._last = now

    def value(self, now: float) -> float:
        return self._value if now - self._last < 2 * self.window_secs else 0.0
