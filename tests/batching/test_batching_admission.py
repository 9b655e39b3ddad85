"""Admission and the event loop's dispatch lag: work that cannot be on time is refused on arrival,
cheaply, and time spent waiting for the loop is neither charged to the endpoint nor allowed to make
a record late. On the fake clock; the figures under real overload are in benchmarks/."""

from __future__ import annotations

import asyncio

from batching import DEFER_DEADLINE, DEFER_OVERLOAD, Batcher, BatchPolicy, Deferred, Endpoint, FakeClock, Ok
from batching.admission import LagEstimate, WindowedExtreme


def _endpoint(clock: FakeClock, a: float = 0.002) -> Endpoint:
    return Endpoint("gpu", clock=clock, prior_a_secs=a, prior_c_secs=0.000001, prior_rho=1.0)


async def test_items_the_standing_queue_would_make_late_are_refused_on_arrival(clock: FakeClock):
    lane = asyncio.Lock()

    async def dispatch(endpoint: str, items: list[int]) -> list[int]:
        async with lane:  # one lane, 15 ms a call whatever its size: the queue stands
            await clock.sleep(0.015)
        return items

    batcher = Batcher(dispatch, endpoints=[_endpoint(clock, 0.015)], policy=BatchPolicy(max_batch=8), clock=clock)
    futures = []
    for _ in range(400):  # 0.5 ms apart, budgets of 50 ms: about four times what the lane serves
        futures.append(batcher.submit_nowait(0, clock.now() + 0.050))
        await clock.advance(0.0005)
    await clock.advance(0.2)
    outcomes = [f.result() for f in futures]
    refused = [o for o in outcomes if o == Deferred(DEFER_OVERLOAD)]
    assert refused, "once the queue stands, arrivals with too little budget left are refused"
    assert all(isinstance(o, Ok) or o == Deferred(DEFER_OVERLOAD) or o == Deferred(DEFER_DEADLINE) for o in outcomes)
    assert not any(isinstance(o, Ok) and o.late for o in outcomes)
    assert batcher.stats().deferred_by_reason[DEFER_OVERLOAD] == len(refused)
    await batcher.close(flush=False)


async def test_nothing_is_refused_without_a_standing_queue_or_lag(clock: FakeClock):
    async def dispatch(endpoint: str, items: list[int]) -> list[int]:
        await clock.sleep(0.003)
        return items

    batcher = Batcher(dispatch, endpoints=[_endpoint(clock)], clock=clock)
    burst = [batcher.submit_nowait(i, clock.now() + 0.050) for i in range(100)]  # a burst, all at once
    await clock.advance(0.2)
    assert all(isinstance(f.result(), Ok) for f in burst)
    assert batcher.stats().deferred == 0
    await batcher.close()


async def _arrivals_on_a_busy_loop(batcher: Batcher, clock: FakeClock, turns: int, turn_secs: float, budget_secs: float) -> list:
    """Ten items per turn of an event loop whose every turn takes ``turn_secs`` (CPU-bound work)."""
    futures = []
    for _ in range(turns):
        futures.extend(batcher.submit_nowait(i, clock.now() + budget_secs) for i in range(10))
        clock.jump(turn_secs)  # the scheduler, woken by the item, runs only after this turn's work
        await clock.advance(0.001)
    await clock.advance(0.1)
    return [f.result() for f in futures]


async def test_a_loop_too_busy_to_run_the_scheduler_in_time_refuses_on_arrival(clock: FakeClock):
    async def dispatch(endpoint: str, items: list[int]) -> list[int]:
        await clock.sleep(0.002)
        return items

    batcher = Batcher(dispatch, endpoints=[_endpoint(clock)], clock=clock)
    # Every turn takes 25 ms and items come with 15 ms: none can be sent in time, so no batch is sent
    # and no standing queue is ever measured. Admitting them would cost queueing and deferring each one.
    outcomes = await _arrivals_on_a_busy_loop(batcher, clock, 100, turn_secs=0.025, budget_secs=0.015)
    deferred = batcher.stats().deferred_by_reason
    assert not any(isinstance(o, Ok) for o in outcomes)
    # Only the first turn's items get in (nothing is known yet); refusals keep the estimate current.
    assert deferred.get(DEFER_OVERLOAD, 0) >= 980, deferred
    assert deferred.get(DEFER_DEADLINE, 0) <= 20, deferred
    # Once the loop is quick again, the long turns age out of the estimate (two windows at most).
    quick = await _arrivals_on_a_busy_loop(batcher, clock, 100, turn_secs=0.0, budget_secs=0.015)
    assert sum(isinstance(o, Ok) and not o.late for o in quick) >= 850
    await batcher.close()


async def test_refusal_needs_no_queue_slot_and_no_scheduler_work(clock: FakeClock):
    batcher = Batcher(lambda endpoint, items: asyncio.sleep(0, items), endpoints=[_endpoint(clock)], max_queue=1, clock=clock)
    past_due = [batcher.submit_nowait(i, clock.now() - 0.001) for i in range(1000)]  # no room for them anyway
    assert all(f.done() and f.result() == Deferred(DEFER_OVERLOAD) for f in past_due)
    assert batcher.stats().queue_depth == 0
    await batcher.close()


def test_windowed_extreme_forgets_after_two_quiet_windows():
    floor = WindowedExtreme(0.1)
    floor.observe(0.00, 0.030)
    floor.observe(0.05, 0.020)
    floor.observe(0.12, 0.040)  # a new window; the previous one's minimum still counts
    assert floor.value(0.15) == 0.020
    assert floor.value(0.33) == 0.0  # nothing sent for two windows: no evidence of a standing queue
    peak = WindowedExtreme(1.0, largest=True)
    peak.observe(0.0, 0.050)
    peak.observe(0.5, 0.010)
    assert peak.value(0.6) == 0.050


def test_lag_estimate_follows_samples_and_reads_zero_once_calls_stop():
    lag = LagEstimate(alpha=0.5, window_secs=0.1)
    lag.observe(0.00, 0.010)
    lag.observe(0.01, 0.000)
    assert lag.value(0.02) == 0.005
    assert lag.value(0.25) == 0.0  # a high reading must not keep refusing the work that would lower it


async def test_a_refusal_before_the_scheduler_ever_ran_is_not_taken_for_a_long_turn(clock: FakeClock):
    async def dispatch(endpoint: str, items: list[int]) -> list[int]:
        await clock.sleep(0.002)
        return items

    batcher = Batcher(dispatch, endpoints=[_endpoint(clock)], clock=clock)  # not started: no scheduler yet
    assert batcher.submit_nowait(-1, clock.now() - 0.001).result() == Deferred(DEFER_OVERLOAD)
    await clock.advance(100.0)
    futures = []
    for i in range(50):  # the first submission starts the scheduler, 100 s after that refusal
        futures.append(batcher.submit_nowait(i, clock.now() + 0.050))
        await clock.advance(0.001)
    await clock.advance(0.1)
    assert all(isinstance(f.result(), Ok) for f in futures), batcher.stats().deferred_by_reason
    await batcher.close()
