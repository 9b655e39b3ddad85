"""Heavy steps on the event loop take turns (gateway/ingest/loop_share.py).

Turns are counted with ``LoopTurns``; steps "cost" what a fake clock is moved by while they run.
"""

from __future__ import annotations

import asyncio

from gateway.ingest.loop_share import LoopShare
from tests.gateway.loop_turns import LoopTurns


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def run_steps(share: LoopShare, clock: FakeClock, steps: int, cost_secs: float) -> list[tuple[int, int]]:
    """Start ``steps`` tasks in one turn, each a step of ``cost_secs``; (step, turn it ran in), in run order."""
    turns = LoopTurns()
    ran: list[tuple[int, int]] = []

    async def step(i: int) -> None:
        async with share:
            clock.now += cost_secs
            ran.append((i, turns.number))

    await asyncio.gather(*(step(i) for i in range(steps)))
    turns.stop()
    return ran


async def test_steps_past_the_budget_wait_for_later_turns_in_arrival_order():
    clock = FakeClock()
    share = LoopShare(lambda: 0.005, clock)
    ran = await run_steps(share, clock, steps=12, cost_secs=0.002)
    assert [i for i, _ in ran] == list(range(12))  # first come, first served
    per_turn: dict[int, int] = {}
    for _, turn in ran:
        per_turn[turn] = per_turn.get(turn, 0) + 1
    # 5 ms of 2 ms steps: three fit in the first turn (the third starts below the budget), then the
    # estimate of a step's cost decides how many each later turn wakes: never all twelve at once.
    assert max(per_turn.values()) <= 3, per_turn
    assert len(per_turn) >= 4, per_turn


async def test_other_callbacks_run_between_the_turns_of_heavy_steps():
    clock = FakeClock()
    share = LoopShare(lambda: 0.005, clock)
    loop = asyncio.get_running_loop()
    events: list[str] = []

    async def step(i: int) -> None:
        async with share:
            clock.now += 0.004
            events.append(f"step {i}")
            if i == 0:
                loop.call_soon(events.append, "cheap")  # e.g. a refusal that arrived meanwhile

    await asyncio.gather(*(step(i) for i in range(6)))
    # Without sharing, all six steps would run before it; here it runs before most of them.
    assert events.index("cheap") <= 3, events


async def test_a_budget_of_zero_runs_every_ready_step_in_the_same_turn():
    clock = FakeClock()
    share = LoopShare(lambda: 0.0, clock)
    ran = await run_steps(share, clock, steps=10, cost_secs=0.002)
    assert len({turn for _, turn in ran}) == 1


async def test_a_waiter_cancelled_before_or_after_its_turn_holds_nobody_up():
    clock = FakeClock()
    share = LoopShare(lambda: 0.001, clock)
    done: list[int] = []

    async def step(i: int) -> None:
        async with share:
            clock.now += 0.002
            done.append(i)

    tasks = [asyncio.create_task(step(i)) for i in range(6)]
    await asyncio.sleep(0)  # all have arrived: step 0 ran, the others wait
    tasks[1].cancel()  # waiting
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # step 2 has been woken for the next turn
    tasks[2].cancel()  # woken, not yet started
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    cancelled = {i for i, r in enumerate(results) if isinstance(r, asyncio.CancelledError)}
    assert set(done) | cancelled == set(range(6))
    assert 0 in done and 5 in done
