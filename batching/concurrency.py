"""Adaptive concurrency limit for one endpoint: AIMD on queueing delay, cut on backpressure.

    limiter = AdaptiveConcurrency(initial=4, minimum=1, maximum=64)
    async with limiter.acquire() as permit:       # waits while in_flight >= limit
        ...
        permit.success(rtt_secs)                     # or permit.success(rtt_secs, expected_secs=predicted)
        # permit.backpressure()  throttling: HTTP 429/503, gRPC UNAVAILABLE, timeouts
        # permit.failure()       any other error
    # leaving the block without a verdict counts as failure

Successes are judged in windows of ``window`` calls by their queueing delay: ``rtt - expected_secs``
when the caller knows what the call should cost (a batch's predicted service time), else ``rtt``
against a learned baseline (the lowest RTTs seen lately). If the window's p90 delay exceeds the
target the limit is cut; if the window was healthy and the limit was actually reached, the limit
grows by one. Backpressure cuts at once, but only once per round of calls, so a burst of 429s from
requests that were all in flight together is one signal, not ten. Other failures say nothing about
capacity (the circuit breaker deals with them) and leave the limit alone.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from types import TracebackType

from batching.clock import Clock, MONOTONIC

_HEALTHY, _BACKPRESSURE, _FAILURE = "success", "backpressure", "failure"


class ConcurrencyPermit:
    """One slot of an endpoint's concurrency, held for the duration of one call."""

    __slots__ = ("_limiter", "_generation", "_verdict", "_released")

    def __init__(self, limiter: AdaptiveConcurrency, generation: int) -> None:
        self._limiter = limiter
        self._generation = generation
        self._verdict: str | None = None
        self._released = False

    def success(self, rtt_secs: float, expected_secs: float | None = None) -> None:
        """The call worked and took ``rtt_secs``; ``expected_secs`` is what it should have taken."""
        self._set_verdict(_HEALTHY)
        self._limiter._on_success(rtt_secs, expected_secs)

    def backpressure(self) -> None:
        """The endpoint pushed back (429/503, UNAVAILABLE, timeout): cut the limit."""
        self._set_verdict(_BACKPRESSURE)
        self._limiter._on_backpressure(self._generation)

    def failure(self) -> None:
        """The call failed for another reason; the limit is left alone."""
        self._set_verdict(_FAILURE)

    def release(self) -> None:
        """Give the slot back (a permit without a verdict counts as a failure). Idempotent."""
        if self._released:
            return
        if self._verdict is None:
            self._verdict = _FAILURE
        self._released = True
        self._limiter._release()

    async def __aenter__(self) -> ConcurrencyPermit:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _set_verdict(self, verdict: str) -> None:
        if self._verdict is not None:
            raise RuntimeError(f"this permit already has a verdict: {self._verdict}")
        self._verdict = verdict


class _Acquisition:
    """``async with limiter.acquire() as permit``: waits for a slot, releases it on exit."""

    __slots__ = ("_limiter", "_permit")

    def __init__(self, limiter: AdaptiveConcurrency) -> None:
        self._limiter = limiter
        self._permit: ConcurrencyPermit | None = None

    async def __aenter__(self) -> ConcurrencyPermit:
        self._permit = await self._limiter._wait_for_slot()
        return self._permit

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._permit is not None:
            self._permit.release()


class AdaptiveConcurrency:
    """How many calls may be in flight to one endpoint, adapted to how the endpoint copes."""

    def __init__(
        self,
        initial: int = 4,
        minimum: int = 1,
        maximum: int = 64,
        *,
        clock: Clock | None = None,
        window: int = 16,
        decrease_ratio: float = 0.9,
        delay_tolerance: float = 0.5,
        min_delay_target_secs: float = 0.001,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError("need 1 <= minimum <= initial <= maximum")
        if not 0 < decrease_ratio < 1 or window < 1:
            raise ValueError("need 0 < decrease_ratio < 1 and window >= 1")
        self.minimum = minimum
        self.maximum = maximum
        self.window = window
        self.decrease_ratio = decrease_ratio
        # Queueing delay is unhealthy above max(min_delay_target_secs, delay_tolerance * typical cost).
        self.delay_tolerance = delay_tolerance
        self.min_delay_target_secs = min_delay_target_secs
        self.clock: Clock = clock or MONOTONIC
        self._limit = initial
        self._in_flight = 0
        self._generation = 0
        self._waiters: deque[asyncio.Future[ConcurrencyPermit]] = deque()
        self._delays: list[float] = []
        self._costs: list[float] = []
        self._rtts: list[float] = []
        self._reached_limit = False
        self._baseline_rtt_secs: float | None = None
        self._idle_total_secs = 0.0
        self._idle_since: float | None = self.clock.now()

    @property
    def limit(self) -> int:
        """Calls allowed in flight now."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Calls in flight now."""
        return self._in_flight

    @property
    def idle_secs(self) -> float:
        """Total time with nothing in flight since this limiter was made."""
        idle = self._idle_total_secs
        if self._idle_since is not None:
            idle += self.clock.now() - self._idle_since
        return idle

    @property
    def baseline_rtt_secs(self) -> float | None:
        """The learned no-queueing RTT used when callers give no expected time."""
        return self._baseline_rtt_secs

    def acquire(self) -> _Acquisition:
        """An async context manager that waits for a slot and yields a :class:`ConcurrencyPermit`."""
        return _Acquisition(self)

    def try_acquire(self) -> ConcurrencyPermit | None:
        """A permit at once if a slot is free and nobody is queued for one, else None."""
        if self._waiters or self._in_flight >= self._limit:
            return None
        return self._grant()

    async def _wait_for_slot(self) -> ConcurrencyPermit:
        permit = self.try_acquire()
        if permit is not None:
            return permit
        # Reaching the limit is what licenses the next increase (not app-limited).
        self._reached_limit = True
        granted: asyncio.Future[ConcurrencyPermit] = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            return await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                granted.result().release()
            raise

    def _grant(self) -> ConcurrencyPermit:
        if self._in_flight == 0 and self._idle_since is not None:
            self._idle_total_secs += self.clock.now() - self._idle_since
            self._idle_since = None
        self._in_flight += 1
        if self._in_flight >= self._limit:
            self._reached_limit = True
        return ConcurrencyPermit(self, self._generation)

    def _release(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle_since = self.clock.now()
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self._grant())

    def _on_success(self, rtt_secs: float, expected_secs: float | None) -> None:
        self._rtts.append(rtt_secs)
        if expected_secs is not None:
            self._delays.append(rtt_secs - expected_secs)
            self._costs.append(expected_secs)
        if len(self._rtts) >= self.window:
            self._close_window()

    def _close_window(self) -> None:
        if self._delays:
            delays = sorted(self._delays)
            typical_cost = sum(self._costs) / len(self._costs)
        else:
            window_min = min(self._rtts)
            if self._baseline_rtt_secs is None or window_min < self._baseline_rtt_secs:
                self._baseline_rtt_secs = window_min
            else:
                # Follow a lasting rise slowly, so latency growth registers before it is forgotten.
                self._baseline_rtt_secs += 0.1 * (window_min - self._baseline_rtt_secs)
            delays = sorted(rtt - self._baseline_rtt_secs for rtt in self._rtts)
            typical_cost = self._baseline_rtt_secs
        p90 = delays[math.ceil(0.9 * len(delays)) - 1]
        target = max(self.min_delay_target_secs, self.delay_tolerance * typical_cost)
        if p90 > target:
            self._cut()
        elif self._reached_limit and self._limit < self.maximum:
            self._limit += 1
            self._hand_over()
        self._rtts.clear()
        self._delays.clear()
        self._costs.clear()
        self._reached_limit = self._in_flight >= self._limit

    def _on_backpressure(self, generation: int) -> None:
        # Calls sent before the last cut already reflect it; one cut per round of calls.
        if generation == self._generation:
            self._cut()

    def _cut(self) -> None:
        self._generation += 1
        self._limit = max(self.minimum, min(self._limit - 1, math.floor(self._limit * self.decrease_ratio)))
