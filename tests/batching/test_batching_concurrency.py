"""AdaptiveConcurrency: waits at the limit, grows on healthy delay, cuts on backpressure and latency."""

from __future__ import annotations

import asyncio

import pytest

from batching import AdaptiveConcurrency, FakeClock


async def run_window(limiter: AdaptiveConcurrency, rtt_secs: float, expected_secs: float | None = None) -> None:
    """One full window of calls, all in flight together so the limit counts as reached."""
    permits = [limiter.try_acquire() for _ in range(limiter.window)]
    held = [permit for permit in permits if permit is not None]
    for permit in held:
        permit.success(rtt_secs, expected_secs)
        permit.release()
    for _ in range(limiter.window - len(held)):
        async with limiter.acquire() as permit:
            permit.success(rtt_secs, expected_secs)


async def test_acquire_waits_while_in_flight_is_at_the_limit(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(initial=2, minimum=1, maximum=4, clock=clock)
    first, second = limiter.acquire(), limiter.acquire()
    permit_1 = await first.__aenter__()
    await second.__aenter__()
    assert limiter.in_flight == 2

    third = asyncio.create_task(limiter.acquire().__aenter__())
    await clock.settle()
    assert not third.done()

    permit_1.success(0.01)
    await first.__aexit__(None, None, None)
    await clock.settle()
    assert third.done() and limiter.in_flight == 2


async def test_limit_grows_by_one_per_healthy_window_that_used_the_limit(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(initial=4, minimum=1, maximum=64, clock=clock, window=8)
    for expected_limit in (5, 6, 7):
        await run_window(limiter, rtt_secs=0.0101, expected_secs=0.010)
        assert limiter.limit == expected_limit


async def test_limit_does_not_grow_when_the_caller_never_uses_it(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(initial=4, minimum=1, maximum=64, clock=clock, window=8)
    for _ in range(32):
        async with limiter.acquire() as permit:  # one at a time: app-limited
            permit.success(0.010, expected_secs=0.010)
    assert limiter.limit == 4


async def test_limit_never_exceeds_maximum(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(initial=4, minimum=1, maximum=5, clock=clock, window=4)
    for _ in range(5):
        await run_window(limiter, rtt_secs=0.010, expected_secs=0.010)
    assert limiter.limit == 5


async def test_backpressure_cuts_once_per_round_and_not_below_minimum(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(initial=10, minimum=3, maximum=64, clock=clock)
    round_one = [limiter.try_acquire() for _ in range(5)]
    for permit in round_one:
        assert permit is not None
        permit.backpressure()  # five 429s from one round of calls are one signal
        permit.release()
    assert limiter.limit == 9

    for expected in (8, 7, 6, 5, 4, 3, 3):
        async with limiter.acquire() as permit:
            permit.backpressure()
        assert limiter.limit == expected


async def test_queueing_delay_above_target_cuts_the_limit(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(initial=10, minimum=1, maximum=64, clock=clock, window=8)
    # Expected 10 ms, observed 20 ms: 10 ms of queueing, above max(1 ms, 0.5 * 10 ms).
    await run_window(limiter, rtt_secs=0.020, expected_secs=0.010)
    assert limiter.limit == 9


async def test_latency_growth_cuts_against_a_learned_baseline(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(initial=8, minimum=1, maximum=64, clock=clock, window=8)
    await run_window(limiter, rtt_secs=0.010)  # learns a 10 ms baseline; healthy and at the limit: +1
    assert limiter.limit == 9
    assert limiter.baseline_rtt_secs == pytest.approx(0.010)
    await run_window(limiter, rtt_secs=0.030)  # tripled latency without any error
    assert limiter.limit == 8


async def test_leaving_without_a_verdict_releases_the_slot_as_a_failure(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(initial=2, minimum=1, maximum=4, clock=clock)
    with pytest.raises(KeyError):
        async with limiter.acquire():
            raise KeyError("boom")
    assert limiter.in_flight == 0 and limiter.limit == 2

    async with limiter.acquire() as permit:
        permit.failure()
        with pytest.raises(RuntimeError):
            permit.success(0.01)


async def test_a_cancelled_waiter_does_not_leak_a_slot(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(initial=1, minimum=1, maximum=4, clock=clock)
    holder = limiter.try_acquire()
    assert holder is not None
    waiter = asyncio.create_task(limiter.acquire().__aenter__())
    await clock.settle()
    waiter.cancel()
    holder.release()
    await clock.settle()
    assert waiter.cancelled()
    assert limiter.in_flight == 0
    assert limiter.try_acquire() is not None


async def test_idle_time_counts_only_time_with_nothing_in_flight(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(initial=2, minimum=1, maximum=4, clock=clock)
    await clock.advance(1.0)
    async with limiter.acquire() as permit:
        await clock.advance(3.0)
        permit.success(3.0)
    await clock.advance(0.5)
    assert limiter.idle_secs == pytest.approx(1.5)


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError):
        AdaptiveConcurrency(initial=0, minimum=1, maximum=4)
    with pytest.raises(ValueError):
        AdaptiveConcurrency(initial=8, minimum=1, maximum=4)
