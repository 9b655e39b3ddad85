"""Items that carry many records (chunks): every batching decision counts records, not items."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

from batching import (
    DEFER_DEADLINE,
    AdaptiveConcurrency,
    Batcher,
    BatchPolicy,
    Deferred,
    Endpoint,
    FakeClock,
    Ok,
    QueueFullError,
    ServiceTimeModel,
)
from batching.policy import REASON_HOPELESS, REASON_NOT_WORTH_WAITING, EndpointView, QueueView, decide


@dataclass
class ChunkCall:
    endpoint: str
    chunks: int
    records: int
    sent_at: float


@dataclass
class ChunkEndpoints:
    """Endpoints whose calls take ``a + c * records`` of fake time, one batch at a time each (FIFO).

    An item is a chunk (a list of ints); its result is the chunk's sum, so results can be checked.
    """

    clock: FakeClock
    costs: dict[str, tuple[float, float]]
    calls: list[ChunkCall] = field(default_factory=list)
    _free_at: dict[str, float] = field(default_factory=dict)

    async def dispatch(self, endpoint: str, chunks: list[list[int]]) -> list[int]:
        a, c = self.costs[endpoint]
        records = sum(len(chunk) for chunk in chunks)
        sent_at = self.clock.now()
        done_at = max(sent_at, self._free_at.get(endpoint, 0.0)) + a + c * records
        self._free_at[endpoint] = done_at
        self.calls.append(ChunkCall(endpoint, len(chunks), records, sent_at))
        await self.clock.sleep_until(done_at)
        return [sum(chunk) for chunk in chunks]


def endpoint(clock: FakeClock, name: str, a: float, c: float, *, rho: float = 1.3, **kwargs: object) -> Endpoint:
    return Endpoint(name, clock=clock, prior_a_secs=a, prior_c_secs=c, prior_rho=rho, **kwargs)  # type: ignore[arg-type]


def chunk(size: int, start: int = 0) -> list[int]:
    return list(range(start, start + size))


async def close(batcher: Batcher, clock: FakeClock) -> None:
    """Close while moving fake time, so in-flight calls can finish."""
    closing = asyncio.create_task(batcher.close())
    await clock.advance(1.0)
    await closing


async def test_batches_respect_max_batch_in_records_with_mixed_sizes(clock: FakeClock) -> None:
    simulated = ChunkEndpoints(clock, {"gpu-a": (0.002, 0.0001)})
    batcher = Batcher(
        simulated.dispatch,
        endpoints=[endpoint(clock, "gpu-a", 0.002, 0.0001)],
        policy=BatchPolicy(max_batch=100),
        clock=clock,
    )
    rng = np.random.default_rng(3)
    chunks = [chunk(int(size), start=i) for i, size in enumerate(rng.integers(1, 61, size=300))]
    futures = [await batcher.submit(c, deadline=10.0, size=len(c)) for c in chunks]
    await clock.advance(5.0)

    records = [call.records for call in simulated.calls]
    assert max(records) <= 100
    assert sum(records) == sum(len(c) for c in chunks)
    assert np.mean(records) > 60  # whole chunks packed up to the record cap, not one chunk per call
    outcomes = [f.result() for f in futures]
    assert [o.value for o in outcomes] == [sum(c) for c in chunks]  # type: ignore[union-attr]
    assert all(isinstance(o, Ok) and len(c) <= o.batch_size <= 100 for o, c in zip(outcomes, chunks))
    await close(batcher, clock)


async def test_an_oversized_item_goes_alone_and_resolves(clock: FakeClock) -> None:
    simulated = ChunkEndpoints(clock, {"gpu-a": (0.002, 0.0001)})
    batcher = Batcher(
        simulated.dispatch,
        endpoints=[endpoint(clock, "gpu-a", 0.002, 0.0001)],
        policy=BatchPolicy(max_batch=16),
        clock=clock,
    )
    small = [batcher.submit_nowait(chunk(4), deadline=1.0, size=4) for _ in range(3)]
    big = batcher.submit_nowait(chunk(40), deadline=1.0, size=40)
    small += [batcher.submit_nowait(chunk(4), deadline=1.0, size=4) for _ in range(3)]
    await clock.advance(0.5)

    outcome = big.result()
    assert isinstance(outcome, Ok) and (outcome.value, outcome.batch_size, outcome.late) == (sum(range(40)), 40, False)
    alone = [call for call in simulated.calls if call.records == 40]
    assert len(alone) == 1 and alone[0].chunks == 1
    others = [call for call in simulated.calls if call.records != 40]
    assert all(call.records <= 16 for call in others)
    assert sum(call.records for call in others) == 24
    assert all(isinstance(f.result(), Ok) for f in small)
    assert batcher.stats().queued_records == 0
    await close(batcher, clock)


async def test_the_service_time_model_learns_c_per_record_from_sized_batches(clock: FakeClock) -> None:
    simulated = ChunkEndpoints(clock, {"gpu-a": (0.005, 0.000005)})
    gpu = endpoint(clock, "gpu-a", 0.002, 0.0000005)  # a poor prior
    batcher = Batcher(simulated.dispatch, endpoints=[gpu], policy=BatchPolicy(max_batch=2000), clock=clock)
    rng = np.random.default_rng(5)
    for _ in range(1500):  # bursty arrivals of chunks of 1 to 100 records, so record counts vary
        for _ in range(int(rng.poisson(rng.choice([0.1, 0.5, 3.0])))):
            size = int(rng.integers(1, 101))
            batcher.submit_nowait(chunk(size), deadline=clock.now() + 0.2, size=size)
        await clock.advance(0.001)
    model = gpu.service_time("default")
    assert model.observed > 100
    assert model.a_secs == pytest.approx(0.005, rel=0.15)
    assert model.c_secs == pytest.approx(0.000005, rel=0.15)  # per record, not per chunk
    await close(batcher, clock)


def test_the_policy_defers_a_head_whose_own_records_cannot_finish_in_time() -> None:
    # S(b) = 1 ms + 0.1 ms * b, no tail. Head due at 2.5 ms: 10 records fit (2 ms), 20 do not (3 ms).
    model = ServiceTimeModel(0.001, 0.0001, prior_rho=1.0)
    idle = EndpointView(model, free_at=0.0, drain_at=0.0, busy=False)
    policy = BatchPolicy()

    def head_of(size: int) -> QueueView:
        return QueueView(
            length=size, head_deadline=0.0025, head_budget_secs=0.050, oldest_enqueued_at=0.0, head_size=size
        )

    assert decide(0.0, head_of(20), idle, policy, 0.0).reason == REASON_HOPELESS
    decision = decide(0.0, head_of(10), idle, policy, 0.0)
    assert (decision.send, decision.reason) == (10, REASON_NOT_WORTH_WAITING)


async def test_hopeless_deferral_accounts_for_the_head_items_size(clock: FakeClock) -> None:
    # S(b) = 2 ms + 1 ms * b exactly (rho 1): one record needs 3 ms, a chunk of 10 needs 12 ms.
    simulated = ChunkEndpoints(clock, {"gpu-a": (0.002, 0.001)})
    batcher = Batcher(simulated.dispatch, endpoints=[endpoint(clock, "gpu-a", 0.002, 0.001, rho=1.0)], clock=clock)
    too_big = await batcher.submit(chunk(10), deadline=0.010, size=10)
    await clock.settle()
    assert too_big.result() == Deferred(DEFER_DEADLINE)
    assert simulated.calls == []  # never sent
    fits = await batcher.submit(chunk(1), deadline=0.010)
    await clock.advance(0.01)
    assert isinstance(fits.result(), Ok)
    await close(batcher, clock)


async def test_a_queued_chunk_leaves_when_its_own_size_no_longer_fits(clock: FakeClock) -> None:
    release = asyncio.Event()

    async def dispatch(name: str, chunks: list[list[int]]) -> list[int]:
        await release.wait()
        return [sum(c) for c in chunks]

    one_slot = AdaptiveConcurrency(initial=1, minimum=1, maximum=1, clock=clock)
    gpu = Endpoint("gpu-a", concurrency=one_slot, prior_a_secs=0.002, prior_c_secs=0.001, prior_rho=1.0)
    batcher = Batcher(dispatch, endpoints=[gpu], clock=clock)
    stuck = await batcher.submit(chunk(1), deadline=1.0)  # holds the only slot
    await clock.settle()
    # Due at 20 ms, needing 12 ms alone: hopeless from 8 ms on (a batch of one would last until 17 ms).
    waiting = await batcher.submit(chunk(10), deadline=0.020, size=10)
    await clock.advance(0.0079)
    assert not waiting.done()
    await clock.advance(0.0002)
    assert waiting.result() == Deferred(DEFER_DEADLINE)
    release.set()
    await clock.advance(0.01)
    assert isinstance(stuck.result(), Ok)
    await close(batcher, clock)


async def test_arrival_rate_and_desired_slots_count_records(clock: FakeClock) -> None:
    simulated = ChunkEndpoints(clock, {"gpu-a": (0.002, 0.00001)})
    batcher = Batcher(simulated.dispatch, endpoints=[endpoint(clock, "gpu-a", 0.002, 0.00001)], clock=clock)
    for i in range(500):  # one chunk of 20 records per ms: 1,000 items/s, 20,000 records/s
        await batcher.submit(chunk(20, start=i), deadline=clock.now() + 0.050, size=20)
        await clock.advance(0.001)
    stats = batcher.stats()
    assert stats.arrival_rate_per_sec == pytest.approx(20_000, rel=0.2)
    per_record = (0.002 + 0.00001 * stats.mean_batch_size) / stats.mean_batch_size
    assert stats.desired_slots == pytest.approx(stats.arrival_rate_per_sec * per_record, rel=1e-6)
    assert 0 < stats.desired_slots < 1
    assert stats.submitted == 500  # counters count items
    await close(batcher, clock)


async def test_stats_report_batch_sizes_and_queue_in_records(clock: FakeClock) -> None:
    simulated = ChunkEndpoints(clock, {"gpu-a": (0.002, 0.0001)})
    batcher = Batcher(simulated.dispatch, endpoints=[endpoint(clock, "gpu-a", 0.002, 0.0001)], clock=clock)
    futures = [batcher.submit_nowait(chunk(size), deadline=1.0, size=size) for size in (10, 20, 30)]
    queued = batcher.stats()
    assert (queued.queue_depth, queued.queued_records) == (3, 60)
    await clock.advance(0.1)

    assert [(call.chunks, call.records) for call in simulated.calls] == [(3, 60)]
    stats = batcher.stats()
    assert (stats.last_batch_size, stats.mean_batch_size) == (60, 60.0)
    assert (stats.queue_depth, stats.queued_records) == (0, 0)
    assert [f.result().batch_size for f in futures] == [60, 60, 60]  # type: ignore[union-attr]
    await close(batcher, clock)


async def test_max_queue_records_bounds_the_queue_in_records(clock: FakeClock) -> None:
    release = asyncio.Event()

    async def dispatch(name: str, chunks: list[list[int]]) -> list[int]:
        await release.wait()
        return [sum(c) for c in chunks]

    one_slot = AdaptiveConcurrency(initial=1, minimum=1, maximum=1, clock=clock)
    gpu = Endpoint("gpu-a", concurrency=one_slot)
    batcher = Batcher(dispatch, endpoints=[gpu], clock=clock, max_queue_records=100)
    first = await batcher.submit(chunk(1), deadline=10.0)  # goes out at once and holds the only slot
    await clock.settle()
    queued = [await batcher.submit(chunk(60), deadline=10.0, size=60), batcher.submit_nowait(chunk(40), 10.0, size=40)]
    with pytest.raises(QueueFullError):
        batcher.submit_nowait(chunk(1), deadline=10.0)
    # Larger than the whole bound: let in once the queue is empty rather than never.
    huge = asyncio.create_task(batcher.submit(chunk(500), deadline=10.0, size=500))
    await clock.advance(1.0)
    assert not huge.done()
    release.set()
    await clock.advance(0.1)
    assert huge.done()
    await clock.advance(0.1)
    outcome = huge.result().result()
    assert isinstance(outcome, Ok) and (outcome.value, outcome.batch_size) == (sum(range(500)), 500)
    assert all(isinstance(f.result(), Ok) for f in [first, *queued])
    await close(batcher, clock)


@pytest.mark.parametrize("size", [0, -3, 1.5, True, "2"])
async def test_size_must_be_a_whole_number_of_records(clock: FakeClock, size: object) -> None:
    batcher = Batcher(ChunkEndpoints(clock, {"gpu-a": (0.002, 0.0001)}).dispatch, endpoints=["gpu-a"], clock=clock)
    with pytest.raises(ValueError):
        batcher.submit_nowait([1], deadline=1.0, size=size)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await batcher.submit([1], deadline=1.0, size=size)  # type: ignore[arg-type]
    assert batcher.stats().submitted == 0
    numpy_size = batcher.submit_nowait(chunk(3), deadline=1.0, size=np.int64(3))  # type: ignore[arg-type]
    await clock.advance(0.1)
    assert numpy_size.result().batch_size == 3  # type: ignore[union-attr]
    await close(batcher, clock)
