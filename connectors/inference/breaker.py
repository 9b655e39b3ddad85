"""A circuit breaker per inference endpoint: closed -> open -> half-open -> closed.

- **Closed**: traffic flows. It opens after ``consecutive_failures`` failures in a row, or when at
  least ``min_requests`` calls in the last ``window_secs`` failed at ``failure_rate`` or more.
- **Open**: no traffic for ``open_secs`` x the number of times it opened in a row (capped at
  ``max_open_secs``, with +-``jitter`` so a fleet of gateways does not probe in lockstep).
- **Half-open**: one probe call at a time. ``half_open_successes`` probe successes in a row close it;
  any probe failure opens it again, for longer.

Only endpoint failures count (timeouts, connection errors, server errors). Backpressure (Triton's
UNAVAILABLE "Exceeds maximum queue size", 429/503) means the endpoint is alive and busy; bad requests
mean the data is wrong. Callers report those with ``release``, which counts for nothing.

Every call takes a ``CallPermit`` first and hands it back with exactly one of ``record_success``,
``record_failure`` or ``release``. A permit remembers the breaker's epoch, so a slow call that started
before the breaker changed state cannot close or re-open it afterwards. Time comes from an injected
clock, so tests drive the state machine without sleeping.
"""

from __future__ import annotations

import enum
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Defaults follow Envoy's outlier detection (5 consecutive, 30 s x ejections, cap 300 s)."""

    consecutive_failures: int = 5
    failure_rate: float = 0.5
    min_requests: int = 20
    window_secs: float = 10.0
    open_secs: float = 30.0
    max_open_secs: float = 300.0
    jitter: float = 0.15
    half_open_successes: int = 3

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.half_open_successes < 1 or self.min_requests < 1:
            raise ValueError("consecutive_failures, half_open_successes and min_requests must be >= 1")
        if not 0.0 < self.failure_rate <= 1.0:
            raise ValueError("failure_rate must be in (0, 1]")
        if self.window_secs <= 0 or self.open_secs <= 0 or self.max_open_secs < self.open_secs:
            raise ValueError("window_secs and open_secs must be > 0, and max_open_secs >= open_secs")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class CallPermit:
    """The right to make one call; ``probe`` is True for the single half-open trial call."""

    epoch: int
    probe: bool


StateListener = Callable[[str, BreakerState, BreakerState], None]


class CircuitBreaker:
    """The breaker of one endpoint. Not thread-safe: use it from one event loop."""

    def __init__(
        self,
        name: str = "",
        settings: BreakerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        on_change: StateListener | None = None,
    ) -> None:
        self.name = name
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._rng = rng
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._epoch = 0
        self._consecutive = 0
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, failed) in the rate window
        self._window_failures = 0
        self._openings = 0  # times opened in a row without closing in between
        self._open_until = 0.0
        self._probe_out = False
        self._probe_successes = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    def allows(self) -> bool:
        """Whether a call could start now (without taking the probe slot)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and not self._probe_out

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it is not open)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self._open_until - self._clock())
        return 0.0

    # -- calls ---------------------------------------------------------------------------------

    def acquire(self) -> CallPermit | None:
        """A permit for one call, or None when the breaker is open or its probe slot is taken."""
        state = self.state
        if state is BreakerState.CLOSED:
            return CallPermit(self._epoch, probe=False)
        if state is BreakerState.HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return CallPermit(self._epoch, probe=True)
        return None

    def record_success(self, permit: CallPermit) -> None:
        if permit.epoch != self._epoch:
            return  # started before the last state change: says nothing about the endpoint now
        if permit.probe:
            self._probe_out = False
            self._probe_successes += 1
            if self._probe_successes >= self.settings.half_open_successes:
                self._openings = 0
                self._transition(BreakerState.CLOSED)
            return
        self._consecutive = 0
        self._observe(failed=False)

    def record_failure(self, permit: CallPermit) -> None:
        if permit.epoch != self._epoch:
            return
        if permit.probe:
            self._probe_out = False
            self._open()
            return
        self._consecutive += 1
        self._observe(failed=True)
        s = self.settings
        total = len(self._outcomes)
        if self._consecutive >= s.consecutive_failures or (
            total >= s.min_requests and self._window_failures >= s.failure_rate * total
        ):
            self._open()

    def release(self, permit: CallPermit) -> None:
        """End a call that says nothing about the endpoint's health (backpressure, bad request, cancel)."""
        if permit.epoch == self._epoch and permit.probe:
            self._probe_out = False

    def trip(self) -> None:
        """Open now, e.g. when a readiness check finds the endpoint down."""
        self._open()

    # -- internals -----------------------------------------------------------------------------

    def _observe(self, *, failed: bool) -> None:
        now = self._clock()
        self._outcomes.append((now, failed))
        self._window_failures += failed
        horizon = now - self.settings.window_secs
        while self._outcomes and self._outcomes[0][0] < horizon:
            _, old_failed = self._outcomes.popleft()
            self._window_failures -= old_failed

    def _open(self) -> None:
        s = self.settings
        self._openings += 1
        duration = min(s.max_open_secs, s.open_secs * self._openings)
        duration *= 1.0 + s.jitter * (2.0 * self._rng() - 1.0)
        self._open_until = self._clock() + duration
        self._transition(BreakerState.OPEN)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        self._consecutive = 0
        self._probe_out = False
        self._probe_successes = 0
        self._outcomes.clear()
        self._window_failures = 0
        if self._on_change is not None and old is not new:
            self._on_change(self.name, old, new)
