"""The fake clock fires timers in time order, only when advanced, and wakes sleepers exactly on time."""

from __future__ import annotations

import asyncio

import pytest

from batching import FakeClock
from batching.clock import wait_event


async def test_timers_fire_in_time_order_and_only_when_due(clock: FakeClock) -> None:
    fired: list[tuple[str, float]] = []
    clock.call_at(0.3, lambda: fired.append(("late", clock.now())))
    clock.call_at(0.1, lambda: fired.append(("early", clock.now())))
    cancelled = clock.call_at(0.2, lambda: fired.append(("cancelled", clock.now())))
    cancelled.cancel()

    await clock.advance(0.15)
    assert fired == [("early", 0.1)]
    assert clock.now() == 0.15
    assert clock.next_timer_at == 0.3

    await clock.advance(1.0)
    assert fired == [("early", 0.1), ("late", 0.3)]
    assert clock.next_timer_at is None


async def test_sleepers_wake_at_their_fake_instant_and_chain(clock: FakeClock) -> None:
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep(0.01)
        woke.append(clock.now())
        await clock.sleep(0.02)  # set while the clock is advancing: must still fire in this advance
        woke.append(clock.now())

    task = asyncio.create_task(sleeper())
    await clock.advance(1.0)
    assert woke == [0.01, pytest.approx(0.03)]
    assert task.done()


async def test_clock_refuses_to_go_backwards(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        await clock.advance(-1.0)


async def test_wait_event_times_out_on_the_fake_clock() -> None:
    clock = FakeClock(start=5.0)
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_event(clock, event, deadline=5.5))
    await clock.advance(0.4)
    assert not waiter.done()
    await clock.advance(0.2)
    assert waiter.result() is False

    setter = asyncio.create_task(wait_event(clock, event, deadline=10.0))
    await clock.settle()
    event.set()
    await clock.settle()
    assert setter.result() is True
