"""The batcher end to end on the fake clock: bounds, deadlines, shedding, backpressure, endpoints."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

from batching import (
    DEFER_BACKPRESSURE,
    DEFER_SHUTDOWN,
    AdaptiveConcurrency,
    BackpressureError,
    BatcherClosedError,
    Batcher,
    BatchPolicy,
    Deferred,
    Endpoint,
    Failed,
    FakeClock,
    Ok,
    QueueFullError,
)

@dataclass
class Call:
    endpoint: str
    size: int
    sent_at: float
    done_at: float


@dataclass
class SimulatedEndpoints:
    """Endpoints whose calls take ``a + c*b`` of fake time, one batch at a time each (FIFO)."""

    clock: FakeClock
    costs: dict[str, tuple[float, float]]
    calls: list[Call] = field(default_factory=list)
    _free_at: dict[str, float] = field(default_factory=dict)

    async def dispatch(self, endpoint: str, items: list[int]) -> list[int]:
        a, c = self.costs[endpoint]
        sent_at = self.clock.now()
        done_at = max(sent_at, self._free_at.get(endpoint, 0.0)) + a + c * len(items)
        self._free_at[endpoint] = done_at
        self.calls.append(Call(endpoint, len(items), sent_at, done_at))
        await self.clock.sleep_until(done_at)
        return [item * 10 for item in items]


@pytest.fixture
def simulated(clock: FakeClock) -> SimulatedEndpoints:
    return SimulatedEndpoints(clock, {"gpu-a": (0.002, 0.0001)})


def endpoint(clock: FakeClock, name: str, a: float, c: float, *, rho: float = 1.3, **kwargs: object) -> Endpoint:
    return Endpoint(name, clock=clock, prior_a_secs=a, prior_c_secs=c, prior_rho=rho, **kwargs)  # type: ignore[arg-type]


async def close(batcher: Batcher, clock: FakeClock) -> None:
    """Close while moving fake time, so in-flight calls can finish."""
    closing = asyncio.create_task(batcher.close())
    await clock.advance(1.0)
    await closing


class Ledger:
    """Every outcome, and the fake time at which it arrived."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.entries: list[tuple[float, float, object]] = []  # (deadline, resolved_at, outcome)

    def track(self, future: asyncio.Future, deadline: float) -> None:
        future.add_done_callback(lambda f: self.entries.append((deadline, self.clock.now(), f.result())))

    def of(self, kind: type) -> list[tuple[float, float, object]]:
        return [entry for entry in self.entries if isinstance(entry[2], kind)]


async def test_no_batch_exceeds_max_batch(clock: FakeClock, simulated: SimulatedEndpoints) -> None:
    batcher = Batcher(
        simulated.dispatch,
        endpoints=[endpoint(clock, "gpu-a", 0.002, 0.0001)],
        policy=BatchPolicy(max_batch=16),
        clock=clock,
    )
    futures = [await batcher.submit(i, deadline=1.0) for i in range(200)]
    await clock.advance(1.0)
    sizes = [call.size for call in simulated.calls]
    assert max(sizes) == 16
    assert sum(sizes) == 200
    assert [f.result().value for f in futures] == [i * 10 for i in range(200)]
    await close(batcher, clock)


async def test_no_item_waits_longer_than_max_wait_for_company(clock: FakeClock) -> None:
    submitted_at: dict[int, float] = {}
    dispatched: list[tuple[float, list[int]]] = []

    async def dispatch(name: str, items: list[int]) -> list[int]:
        dispatched.append((clock.now(), items))
        await clock.sleep(0.001 + 0.00001 * len(items))
        return items

    policy = BatchPolicy(max_wait_secs=0.005)
    batcher = Batcher(dispatch, endpoints=[endpoint(clock, "gpu-a", 0.001, 0.00001)], policy=policy, clock=clock)
    for i in range(100):  # one item per ms: waiting for company is worth it
        submitted_at[i] = clock.now()
        await batcher.submit(i, deadline=clock.now() + 1.0)
        await clock.advance(0.001)
    await clock.advance(0.1)

    assert sum(len(items) for _, items in dispatched) == 100
    for sent_at, items in dispatched:
        assert sent_at - min(submitted_at[i] for i in items) <= policy.max_wait_secs + 1e-9
    assert np.mean([len(items) for _, items in dispatched]) >= 3  # it did wait and batch
    await close(batcher, clock)


async def test_batch_size_follows_the_deadline_arithmetic(clock: FakeClock) -> None:
    # S(b) = 2 ms + 1 ms * b exactly (rho 1). Budget 13.5 ms: 2 * S(b) <= 0.8 * 13.5  ->  b* = 3.
    simulated = SimulatedEndpoints(clock, {"gpu-a": (0.002, 0.001)})
    ledger = Ledger(clock)
    batcher = Batcher(simulated.dispatch, endpoints=[endpoint(clock, "gpu-a", 0.002, 0.001, rho=1.0)], clock=clock)
    for i in range(40):
        ledger.track(await batcher.submit(i, deadline=0.0135), 0.0135)
    await clock.advance(0.1)

    first_two = simulated.calls[:2]
    assert [(c.size, c.sent_at) for c in first_two] == [(3, 0.0), (3, 0.0)]  # two slots, b* each
    assert len(ledger.entries) == 40
    assert all(not outcome.late for _, _, outcome in ledger.of(Ok))  # type: ignore[attr-defined]
    assert all(resolved <= deadline for deadline, resolved, _ in ledger.of(Deferred))
    assert len(ledger.of(Ok)) >= 6 and len(ledger.of(Deferred)) > 0
    await close(batcher, clock)


async def test_overload_sheds_early_and_never_serves_late(clock: FakeClock) -> None:
    # Capacity is about 128 items / 14.8 ms = 8,600/s; offer 25,000/s for 0.2 s.
    simulated = SimulatedEndpoints(clock, {"gpu-a": (0.002, 0.0001)})
    ledger = Ledger(clock)
    batcher = Batcher(
        simulated.dispatch, endpoints=[endpoint(clock, "gpu-a", 0.002, 0.0001)], clock=clock, max_queue=100_000
    )
    submitted = 0
    for _ in range(200):
        for _ in range(25):
            deadline = clock.now() + 0.050
            ledger.track(await batcher.submit(submitted, deadline), deadline)
            submitted += 1
        await clock.advance(0.001)
    await clock.advance(0.2)

    ok, deferred = ledger.of(Ok), ledger.of(Deferred)
    assert len(ok) + len(deferred) == submitted == len(ledger.entries)
    assert not any(outcome.late for _, _, outcome in ok)  # type: ignore[attr-defined]
    assert all(resolved <= deadline for deadline, resolved, _ in deferred)
    assert len(deferred) > submitted / 2
    assert len(ok) >= 0.8 * 8_600 * 0.2  # goodput stays near capacity instead of collapsing
    assert np.mean([call.size for call in simulated.calls]) > 64
    stats = batcher.stats()
    assert stats.deferred == len(deferred) and stats.ok == len(ok) and stats.queue_depth == 0
    await close(batcher, clock)


async def test_a_full_queue_makes_submit_wait_with_a_deadline(clock: FakeClock) -> None:
    release = asyncio.Event()

    async def dispatch(name: str, items: list[int]) -> list[int]:
        await release.wait()
        return items

    one_slot = AdaptiveConcurrency(initial=1, minimum=1, maximum=1, clock=clock)
    batcher = Batcher(dispatch, endpoints=[Endpoint("gpu-a", concurrency=one_slot)], clock=clock, max_queue=4)
    first = await batcher.submit(0, deadline=10.0)  # goes out at once and holds the only slot
    await clock.settle()
    queued = [await batcher.submit(i, deadline=10.0) for i in range(1, 5)]
    assert batcher.stats().queue_depth == 4

    with pytest.raises(QueueFullError):
        batcher.submit_nowait(5, deadline=10.0)
    impatient = asyncio.create_task(batcher.submit(5, deadline=10.0, timeout_secs=0.5))
    await clock.advance(0.4)
    assert not impatient.done()
    await clock.advance(0.2)
    with pytest.raises(QueueFullError):
        impatient.result()

    patient = asyncio.create_task(batcher.submit(6, deadline=10.0))
    await clock.advance(1.0)
    assert not patient.done()
    release.set()
    await clock.advance(0.1)
    assert patient.done()
    await clock.advance(0.1)
    assert all(isinstance(f.result(), Ok) for f in [first, *queued, patient.result()])
    await close(batcher, clock)


async def test_picks_the_endpoint_with_the_earliest_predicted_completion(clock: FakeClock) -> None:
    # fast: 2 ms + 1 ms/item; flat: 6 ms whatever the size.
    simulated = SimulatedEndpoints(clock, {"fast": (0.002, 0.001), "flat": (0.006, 0.0)})
    endpoints = [endpoint(clock, "fast", 0.002, 0.001), endpoint(clock, "flat", 0.006, 1e-9)]
    batcher = Batcher(simulated.dispatch, endpoints=endpoints, clock=clock)

    await batcher.submit(0, deadline=1.0)  # one item: fast finishes in 3 ms, flat in 6 ms
    await clock.advance(0.1)
    assert [call.endpoint for call in simulated.calls] == ["fast"]

    for i in range(30):  # thirty items: fast needs 32 ms, flat still 6 ms
        batcher.submit_nowait(i, deadline=1.0)
    await clock.advance(0.1)
    assert (simulated.calls[1].endpoint, simulated.calls[1].size) == ("flat", 30)

    batcher.set_available("fast", False)  # a breaker opened
    await batcher.submit(99, deadline=1.0)
    await clock.advance(0.1)
    assert simulated.calls[-1].endpoint == "flat"
    await close(batcher, clock)


async def test_backpressure_requeues_cuts_concurrency_and_defers_after_max_attempts(clock: FakeClock) -> None:
    refusals = {"left": 1}

    async def dispatch(name: str, items: list[int]) -> list[int]:
        await clock.sleep(0.002)
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise BackpressureError("503")
        return items

    limiter = AdaptiveConcurrency(initial=6, minimum=2, maximum=8, clock=clock)
    batcher = Batcher(dispatch, endpoints=[Endpoint("gpu-a", concurrency=limiter)], clock=clock, max_attempts=2)
    retried = await batcher.submit(1, deadline=1.0)
    await clock.advance(0.1)
    assert retried.result() == Ok(1, "gpu-a", 1, pytest.approx(0.004), False)
    assert limiter.limit == 5

    refusals["left"] = 100
    given_up = await batcher.submit(2, deadline=1.0)
    await clock.advance(0.1)
    assert given_up.result() == Deferred(DEFER_BACKPRESSURE)
    await close(batcher, clock)


async def test_other_dispatch_errors_fail_the_batch_explicitly(clock: FakeClock) -> None:
    boom = RuntimeError("model crashed")

    async def dispatch(name: str, items: list[int]) -> list[int]:
        raise boom

    batcher = Batcher(dispatch, endpoints=["gpu-a"], clock=clock)
    future = await batcher.submit(1, deadline=1.0)
    await clock.advance(0.01)
    assert future.result() == Failed(boom, "gpu-a")
    assert batcher.stats().failed == 1
    await close(batcher, clock)


async def test_close_flushes_what_is_queued(clock: FakeClock, simulated: SimulatedEndpoints) -> None:
    batcher = Batcher(simulated.dispatch, endpoints=["gpu-a"], clock=clock, policy=BatchPolicy(max_wait_secs=1.0))
    for i in range(20):  # a steady stream makes the policy wait for company
        await batcher.submit(i, deadline=clock.now() + 10.0)
        await clock.advance(0.001)
    queued = [await batcher.submit(i, deadline=clock.now() + 10.0) for i in range(20, 23)]
    closing = asyncio.create_task(batcher.close(flush=True))
    await clock.advance(0.1)
    assert closing.done()
    assert all(isinstance(f.result(), Ok) for f in queued)
    with pytest.raises(BatcherClosedError):
        await batcher.submit(99, deadline=20.0)


async def test_close_without_flush_defers_the_queue_and_cancels_stuck_calls(clock: FakeClock) -> None:
    async def dispatch(name: str, items: list[int]) -> list[int]:
        await asyncio.Event().wait()  # an endpoint that never answers
        return items

    one_slot = AdaptiveConcurrency(initial=1, minimum=1, maximum=1, clock=clock)
    batcher = Batcher(dispatch, endpoints=[Endpoint("gpu-a", concurrency=one_slot)], clock=clock)
    stuck = await batcher.submit(0, deadline=100.0)
    await clock.settle()
    queued = await batcher.submit(1, deadline=100.0)
    closing = asyncio.create_task(batcher.close(flush=False, timeout_secs=2.0))
    await clock.advance(1.0)
    assert queued.result() == Deferred(DEFER_SHUTDOWN)
    assert not closing.done()
    await clock.advance(1.5)
    assert closing.done()
    assert stuck.result() == Deferred(DEFER_SHUTDOWN)
    assert one_slot.in_flight == 0


async def test_stats_report_rate_desired_capacity_and_idle_time(clock: FakeClock, simulated: SimulatedEndpoints) -> None:
    batcher = Batcher(simulated.dispatch, endpoints=[endpoint(clock, "gpu-a", 0.002, 0.0001)], clock=clock)
    for i in range(500):  # 1,000 items/s for half a second
        await batcher.submit(i, deadline=clock.now() + 0.050)
        await clock.advance(0.001)
    stats = batcher.stats()
    assert stats.arrival_rate_per_sec == pytest.approx(1000, rel=0.2)
    per_item = (0.002 + 0.0001 * stats.mean_batch_size) / stats.mean_batch_size
    assert stats.desired_slots == pytest.approx(stats.arrival_rate_per_sec * per_item, rel=1e-6)
    assert 0 < stats.desired_slots < 1
    assert stats.mean_batch_size > 1 and stats.last_batch_size >= 1
    (gpu,) = stats.endpoints
    busy = sum(call.done_at - call.sent_at for call in simulated.calls)
    assert gpu.idle_secs == pytest.approx(clock.now() - busy, abs=0.02)
    assert gpu.concurrency_limit >= 2
    await close(batcher, clock)


async def test_the_service_time_model_learns_the_endpoint_from_its_calls(clock: FakeClock) -> None:
    simulated = SimulatedEndpoints(clock, {"gpu-a": (0.005, 0.0002)})
    gpu = endpoint(clock, "gpu-a", 0.002, 0.00002)  # a poor prior
    batcher = Batcher(simulated.dispatch, endpoints=[gpu], clock=clock)
    rng = np.random.default_rng(5)
    for _ in range(1500):  # bursty arrivals, so batch sizes vary
        for _ in range(int(rng.poisson(rng.choice([0.1, 0.5, 3.0])))):
            batcher.submit_nowait(0, deadline=clock.now() + 0.2)
        await clock.advance(0.001)
    model = gpu.service_time("default")
    assert model.observed > 100
    assert model.a_secs == pytest.approx(0.005, rel=0.15)
    assert model.c_secs == pytest.approx(0.0002, rel=0.15)
    await close(batcher, clock)
