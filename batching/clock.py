"""Clocks for the batcher: the real monotonic clock and a fake one that tests advance by hand.

Everything in ``batching`` reads time and sets timers through a :class:`Clock`, so a test can run
hours of batching decisions in microseconds without a single real sleep. Times are seconds on the
clock's own axis (``time.monotonic`` for the real clock), never wall-clock timestamps.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class Cancellable(Protocol):
    """A scheduled callback that can still be called off."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """The only way the batching code reads time or waits for it."""

    def now(self) -> float:
        """Current time in seconds."""
        ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Cancellable:
        """Run ``callback`` once the clock reaches ``when`` (soon, if ``when`` is already past)."""
        ...

    async def sleep_until(self, when: float) -> None:
        """Return once the clock reaches ``when``."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and the running event loop's timers."""

    def now(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], object]) -> Cancellable:
        loop = asyncio.get_running_loop()
        return loop.call_later(max(0.0, when - self.now()), callback)

    async def sleep_until(self, when: float) -> None:
        await asyncio.sleep(max(0.0, when - self.now()))


# The one real clock; every default uses it, so parts built separately agree on their clock.
MONOTONIC = MonotonicClock()


class FakeTimer:
    """A callback waiting on a :class:`FakeClock`."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A clock that only moves when the test says so.

    ``await clock.advance(0.010)`` fires every timer due in the next 10 ms in time order, and after
    each one yields to the event loop ``settle_rounds`` times, so that the tasks it woke can run and
    set their next timers before time moves on. A task chain that needs more loop turns than that
    to reach its next wait on the clock needs a larger ``settle_rounds``.
    """

    def __init__(self, start: float = 0.0, *, settle_rounds: int = 8) -> None:
        self._now = float(start)
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._order = itertools.count()
        self.settle_rounds = settle_rounds

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], object]) -> FakeTimer:
        timer = FakeTimer(when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    async def sleep_until(self, when: float) -> None:
        if when <= self._now:
            await asyncio.sleep(0)
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.call_at(when, lambda: woken.done() or woken.set_result(None))
        try:
            await woken
        finally:
            timer.cancel()

    async def sleep(self, seconds: float) -> None:
        """Convenience for simulated work: wait ``seconds`` of fake time."""
        await self.sleep_until(self._now + seconds)

    @property
    def next_timer_at(self) -> float | None:
        """When the earliest live timer is due, or None when nothing waits on this clock."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    async def settle(self) -> None:
        """Let every task that is ready run until it waits again."""
        for _ in range(self.settle_rounds):
            await asyncio.sleep(0)

    def jump(self, seconds: float) -> None:
        """Move time forward without running anything: the event loop was busy for ``seconds`` (a
        CPU-bound callback). Timers that came due meanwhile fire, late, at the next ``advance``."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._now += seconds

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing due timers in order."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        await self.advance_to(self._now + seconds)

    async def advance_to(self, when: float) -> None:
        """Move time forward to ``when``, firing due timers in order (timers set meanwhile too)."""
        await self.settle()
        while True:
            due = self.next_timer_at
            if due is None or due > when:
                break
            self._now = max(self._now, due)
            # Fire everything due at this instant before letting tasks react.
            while self._timers and self._timers[0][0] <= self._now:
                _, _, timer = heapq.heappop(self._timers)
                if not timer.cancelled:
                    timer.cancelled = True
                    timer.callback()
            await self.settle()
        self._now = max(self._now, when)
        await self.settle()


async def wait_event(clock: Clock, event: asyncio.Event, deadline: float | None) -> bool:
    """Wait for ``event`` until ``deadline`` on ``clock``; True if it was set in time."""
    if event.is_set():
        return True
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[bool] = loop.create_future()
    watcher = loop.create_task(event.wait())
    watcher.add_done_callback(lambda _: outcome.done() or outcome.set_result(True))
    timer = None
    if deadline is not None:
        timer = clock.call_at(deadline, lambda: outcome.done() or outcome.set_result(False))
    try:
        return await outcome
    finally:
        if timer is not None:
            timer.cancel()
        watcher.cancel()
