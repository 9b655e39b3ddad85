"""Shared pieces for the batching tests: a fake clock and endpoints simulated on it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from batching import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


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
