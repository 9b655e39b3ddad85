"""Heavy steps on the event loop take turns: a few milliseconds of them per turn of the loop.

A worker decodes typical bodies on its event loop (handler.py). When many bodies complete at once,
say after a pause, every one of them is ready to decode in the same turn, and the loop does not read
a socket again until all are done: tens or hundreds of milliseconds in which a request that would be
refused at once, or answered from a finished fsync, waits behind work that is not its own. Sharing
the turns, the loop polls its sockets after about ``budget_secs`` of such steps, so what is cheap is
answered within a turn or two of arriving. Steps run in arrival order either way.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

# How much one step's cost moves the running estimate that decides how many waiters a turn wakes.
_COST_WEIGHT = 0.2


class LoopShare:
    """``async with share:`` around a step that holds the loop without awaiting; first come, first
    served, about ``budget_secs()`` of steps per turn (always at least one; 0 or less: no limit)."""

    def __init__(self, budget_secs: Callable[[], float], clock: Callable[[], float] = time.perf_counter) -> None:
        self._budget_secs = budget_secs
        self._clock = clock
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._spent = 0.0  # by the steps of this turn
        self._granted = 0  # waiters woken to run in the next turn, not yet started
        self._step_cost = 0.0  # running estimate of one step
        self._next_turn_scheduled = False
        self._started_at = 0.0

    async def __aenter__(self) -> None:
        budget = self._budget_secs()
        if budget <= 0 and not self._waiters:  # sharing is off: every step runs as soon as it is ready
            self._started_at = self._clock()
            return
        if self._waiters or self._granted or self._spent >= budget:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            self._schedule_next_turn()
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._granted -= 1  # woken, then cancelled: its share of the turn goes unused
                elif future in self._waiters:  # a turn may have passed it over already
                    self._waiters.remove(future)
                raise
            self._granted -= 1
        self._started_at = self._clock()

    async def __aexit__(self, *exc_info: object) -> None:
        cost = self._clock() - self._started_at
        self._spent += cost
        self._step_cost += _COST_WEIGHT * (cost - self._step_cost) if self._step_cost else cost
        self._schedule_next_turn()

    def _schedule_next_turn(self) -> None:
        if not self._next_turn_scheduled:
            self._next_turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        # call_soon runs this in the loop's next turn, after it has polled its sockets once more.
        self._next_turn_scheduled = False
        self._spent = 0.0
        budget = self._budget_secs()
        if budget <= 0:
            wake = len(self._waiters)  # sharing was turned off: let every waiter go
        else:
            wake = max(1, int(budget / self._step_cost)) if self._step_cost > 0 else 1
        while self._waiters and wake > 0:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # it resumes in the turn after this one
                self._granted += 1
                wake -= 1
        if self._waiters:
            self._schedule_next_turn()
