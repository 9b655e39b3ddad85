"""An endpoint with nothing behind it that can take a call (no server ready yet, every breaker open):
its items are held and deferred at their deadline, never failed, and scored once it comes back."""

from __future__ import annotations

import asyncio

from batching import DEFER_DEADLINE, Batcher, BatchPolicy, Deferred, Endpoint, FakeClock, Ok, UnavailableError


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_unavailable_endpoint_defers_at_the_deadline_instead_of_failing(clock: FakeClock):
    calls: list[int] = []

    async def dispatch(endpoint: str, items: list[int]) -> list[int]:
        calls.append(len(items))
        raise UnavailableError("nothing ready", retry_after_secs=0.5)

    batcher = Batcher(dispatch, endpoints=[Endpoint("pool", clock=clock)], policy=BatchPolicy(max_wait_secs=0.0), clock=clock)
    future = batcher.submit_nowait(1, clock.now() + 2.0)
    await _settle()
    assert calls == [1] and not future.done()  # back in the queue, the endpoint resting
    await clock.advance(0.4)
    assert calls == [1]  # still resting: nothing is sent, nothing spins
    await clock.advance(0.2)
    assert calls == [1, 1]  # tried again after the rest
    await clock.advance(2.0)
    assert future.done() and future.result() == Deferred(DEFER_DEADLINE)
    stats = batcher.stats()
    assert stats.failed == 0 and stats.deferred_by_reason == {DEFER_DEADLINE: 1}
    await batcher.close()


async def test_items_held_while_unavailable_are_scored_when_it_comes_back(clock: FakeClock):
    ready = False

    async def dispatch(endpoint: str, items: list[int]) -> list[int]:
        if not ready:
            raise UnavailableError("model loading", retry_after_secs=10.0)
        return [item * 10 for item in items]

    batcher = Batcher(dispatch, endpoints=[Endpoint("pool", clock=clock)], policy=BatchPolicy(max_wait_secs=0.0), clock=clock)
    futures = [batcher.submit_nowait(i, clock.now() + 5.0) for i in range(3)]
    await _settle()
    await clock.advance(1.0)
    assert not any(f.done() for f in futures)
    ready = True
    batcher.set_available("pool", True)  # the pool says an endpoint became ready: the rest ends now
    await _settle()
    assert [f.result().value for f in futures] == [0, 10, 20]
    assert all(isinstance(f.result(), Ok) for f in futures)
    await batcher.close()
